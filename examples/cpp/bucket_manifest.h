// Parser of pipeline.engines.txt, the engine manifest `staticprune build DIR` writes beside pipeline.json
// (grammar in docs/buckets.md, "On TensorRT and in C++"). Standard C++17 only (no TensorRT, no CUDA), so that
// tests/test_bucket_engines.py can compile it with a small driver and check it against the Python writer.
#pragma once

#include <cstdlib>
#include <istream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

struct BucketEngine {
  int stage = 0;
  int capacity = 0;  // 0 for the prefix (stage 0)
  std::string engine;  // relative to the pipeline folder
};

struct BucketManifest {
  int height = 0, width = 0, batch = 0;
  float mean[3] = {0.f, 0.f, 0.f}, stdv[3] = {1.f, 1.f, 1.f};
  bool rawInput = false;
  std::string input, suffix, count;
  std::vector<std::string> state, outputs;
  std::vector<std::string> points;  // points[k - 1]: the reduction point whose count picks stage k's bucket
  std::vector<std::vector<BucketEngine>> stages;  // stages[k]: its graphs, capacities increasing
};

namespace bucket_manifest_detail {

inline bool readInts(std::istringstream& words, int* out, int n) {
  for (int i = 0; i < n; ++i)
    if (!(words >> out[i])) return false;
  return true;
}

inline bool readFloats(std::istringstream& words, float* out, int n) {
  for (int i = 0; i < n; ++i) {
    std::string w;
    if (!(words >> w)) return false;
    char* end = nullptr;
    out[i] = std::strtof(w.c_str(), &end);
    if (end == w.c_str() || *end != '\0') return false;
  }
  return true;
}

inline std::vector<std::string> rest(std::istringstream& words) {
  std::vector<std::string> names;
  for (std::string w; words >> w;) names.push_back(w);
  return names;
}

}  // namespace bucket_manifest_detail

// Parses and checks the manifest; returns "" on success, else one line naming the problem.
inline std::string parseBucketManifest(std::istream& in, BucketManifest& m) {
  using namespace bucket_manifest_detail;
  std::string line;
  int lineNo = 1;
  if (!std::getline(in, line) || line != "staticprune-bucket-engines 1")
    return "not a staticprune engine manifest (first line must be 'staticprune-bucket-engines 1')";
  std::vector<BucketEngine> engines;
  std::vector<std::pair<int, std::string>> points;
  while (std::getline(in, line)) {
    ++lineNo;
    if (line.empty()) continue;
    std::istringstream words(line);
    std::string key, extra;
    words >> key;
    bool ok = true;
    if (key == "size") {
      int hw[2];
      ok = readInts(words, hw, 2) && hw[0] > 0 && hw[1] > 0;
      m.height = hw[0];
      m.width = hw[1];
    } else if (key == "batch") {
      ok = readInts(words, &m.batch, 1) && m.batch > 0;
    } else if (key == "mean") {
      ok = readFloats(words, m.mean, 3);
    } else if (key == "std") {
      ok = readFloats(words, m.stdv, 3);
    } else if (key == "raw_input") {
      int v = -1;
      ok = readInts(words, &v, 1) && (v == 0 || v == 1);
      m.rawInput = v == 1;
    } else if (key == "input") {
      ok = static_cast<bool>(words >> m.input);
    } else if (key == "suffix") {
      ok = static_cast<bool>(words >> m.suffix);
    } else if (key == "count") {
      ok = static_cast<bool>(words >> m.count);
    } else if (key == "state") {
      m.state = rest(words);
      ok = !m.state.empty();
    } else if (key == "output") {
      m.outputs = rest(words);
      ok = !m.outputs.empty();
    } else if (key == "point") {
      int k = 0;
      std::string name;
      ok = readInts(words, &k, 1) && k >= 1 && static_cast<bool>(words >> name);
      points.emplace_back(k, name);
    } else if (key == "stage") {
      BucketEngine e;
      std::string capWord, engineWord;
      ok = readInts(words, &e.stage, 1) && (words >> capWord) && capWord == "capacity" &&
           readInts(words, &e.capacity, 1) && (words >> engineWord) && engineWord == "engine" &&
           static_cast<bool>(words >> e.engine) && e.stage >= 0 && e.capacity >= 0;
      engines.push_back(e);
    } else {
      return "line " + std::to_string(lineNo) + ": unknown record '" + key + "'";
    }
    if (ok && key != "state" && key != "output" && (words >> extra)) ok = false;  // trailing words
    if (!ok) return "line " + std::to_string(lineNo) + ": malformed '" + key + "' record: " + line;
  }
  if (m.height == 0 || m.batch == 0 || m.input.empty() || m.suffix.empty() || m.count.empty() || m.state.empty() ||
      m.outputs.empty())
    return "manifest lacks one of size, batch, input, suffix, count, state, output";
  if (std::set<std::string>(m.state.begin(), m.state.end()).count(m.count) == 0)
    return "count '" + m.count + "' is not one of the state tensors";
  int numStages = 0;
  for (const BucketEngine& e : engines) numStages = e.stage + 1 > numStages ? e.stage + 1 : numStages;
  m.stages.assign(numStages, {});
  for (const BucketEngine& e : engines) {
    std::vector<BucketEngine>& s = m.stages[e.stage];
    if (!s.empty() && e.capacity <= s.back().capacity)
      return "stage " + std::to_string(e.stage) + ": capacities must increase";
    s.push_back(e);
  }
  if (numStages < 2) return "manifest lists fewer than two stages";
  if (m.stages[0].size() != 1 || m.stages[0][0].capacity != 0) return "stage 0 must be one prefix engine, capacity 0";
  for (int k = 1; k < numStages; ++k)
    if (m.stages[k].empty() || m.stages[k][0].capacity == 0)
      return "stage " + std::to_string(k) + " has no bucket engines with a capacity > 0";
  m.points.assign(numStages - 1, "");
  for (const auto& p : points) {
    if (p.first >= numStages || !m.points[p.first - 1].empty())
      return "point record for stage " + std::to_string(p.first) + " is out of range or repeated";
    m.points[p.first - 1] = p.second;
  }
  for (int k = 1; k < numStages; ++k)
    if (m.points[k - 1].empty()) return "no point record for stage " + std::to_string(k);
  return "";
}

// The smallest capacity >= the largest count (the largest capacity if none holds it; its graph then reports the
// excess in `overflow`), as staticprune.runtime.buckets.pick_bucket.
inline const BucketEngine& pickBucket(const std::vector<BucketEngine>& buckets, int largestCount) {
  for (const BucketEngine& b : buckets)
    if (b.capacity >= largestCount) return b;
  return buckets.back();
}
