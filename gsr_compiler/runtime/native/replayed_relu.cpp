// ReLU / LeakyReLU that records, or repeats, the sign choices of its elements near 0, in one pass
// per row (gsr_compiler.runtime.replayed_relu is the torch reference beside it).
//
//   y = x > 0 ? x : slope * x      (slope 0: ReLU; NaN passes through, as in torch)
//
// record: also writes the flat positions (ascending) of the elements with |x| <= margin * rms(row)
//         and |x| / rms(row): what a reversible block's forward keeps for its backward.
// replay: forces the elements at the given positions to the given side of 0, and counts the
//         elements with |x| <= margin * rms(row) (the caller subtracts the forced ones).
// Both write rms(row). The row is summed with eight partial sums, so that the loop vectorises.
//
// Built at first use by gsr_compiler.runtime.native (a plain C ABI, called through ctypes).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

// As torch: relu(x) = x < 0 ? 0 : x (NaN and -0.0 pass), leaky_relu(x) = x > 0 ? x : x * slope.
inline float relu(float v) { return v < 0.0f ? 0.0f : v; }
inline float leaky(float v, float slope) { return v > 0.0f ? v : v * slope; }

float row_rms(const float* row, int64_t width) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= width; c += 8)
    for (int l = 0; l < 8; ++l) part[l] += row[c + l] * row[c + l];
  float sum = 0.0f;
  for (; c < width; ++c) sum += row[c] * row[c];
  for (int l = 0; l < 8; ++l) sum += part[l];
  return std::sqrt(sum / static_cast<float>(width));
}

struct Found {
  std::vector<int64_t> positions;
  std::vector<float> margins;
  int64_t count = 0;
};

struct Job {
  const float* x;
  float* y;
  float* rms;
  int64_t width;
  float slope, margin;
  bool record;
  const int64_t* forced;  // replay: ascending flat positions
  const uint8_t* positive;
  int64_t n_forced;
  int64_t cap;  // record: positions beyond this many are counted, not collected
};

// Writes through `out` could alias any float the loop reads through a pointer, so everything the
// loops read besides the row is copied into locals first: then they vectorise.
void row_relu(const float* __restrict row, float* __restrict out, int64_t w, float slope,
              float limit, int32_t* count_out) {
  int32_t count = 0;  // 32-bit: the compare-and-add vectorises with float lanes
  if (slope == 0.0f) {
    for (int64_t c = 0; c < w; ++c) {
      out[c] = relu(row[c]);
      count += std::fabs(row[c]) <= limit;
    }
  } else {
    for (int64_t c = 0; c < w; ++c) {
      out[c] = leaky(row[c], slope);
      count += std::fabs(row[c]) <= limit;
    }
  }
  *count_out = count;
}

void run_rows(const Job& job, int64_t begin, int64_t end, Found* found) {
  const int64_t w = job.width;
  const float slope = job.slope, margin = job.margin;
  // The forced positions of these rows (replay).
  const int64_t* f = job.forced ? std::lower_bound(job.forced, job.forced + job.n_forced, begin * w)
                                : nullptr;
  const int64_t* f_end = job.forced ? job.forced + job.n_forced : nullptr;
  for (int64_t r = begin; r < end; ++r) {
    const float* row = job.x + r * w;
    float* out = job.y + r * w;
    const float rms = row_rms(row, w);
    job.rms[r] = rms;
    const float limit = margin * rms;  // NaN rms: nothing matches, as in torch
    int32_t count;
    row_relu(row, out, w, slope, limit, &count);
    found->count += count;
    if (job.record && count && static_cast<int64_t>(found->positions.size()) < job.cap) {
      for (int64_t c = 0; c < w; ++c) {
        if (std::fabs(row[c]) <= limit) {
          found->positions.push_back(r * w + c);
          found->margins.push_back(std::fabs(row[c]) / rms);
        }
      }
    }
    for (; f && f < f_end && *f < (r + 1) * w; ++f) {
      const float v = job.x[*f];
      job.y[*f] = job.positive[f - job.forced] ? v : v * slope;
    }
  }
}

int64_t run(const Job& job, int64_t rows, int64_t* positions, float* margins, int64_t cap,
            int threads) {
  // A thread per 1M elements at most: below that, starting one costs more than it saves.
  const int64_t n = std::max<int64_t>(
      1, std::min<int64_t>({threads, std::max<int64_t>(1, rows * job.width / (1 << 20)), rows}));
  const int64_t chunk = (rows + n - 1) / n;
  std::vector<Found> found(n);
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n; ++t) {
    const int64_t begin = std::min(rows, t * chunk), end = std::min(rows, begin + chunk);
    try {
      pool.emplace_back(run_rows, std::cref(job), begin, end, &found[t]);
    } catch (...) {  // no thread to be had: this one does the chunk
      run_rows(job, begin, end, &found[t]);
    }
  }
  run_rows(job, 0, std::min(rows, chunk), &found[0]);
  for (auto& worker : pool) worker.join();
  int64_t total = 0;
  for (const Found& f : found) {
    for (size_t i = 0; i < f.positions.size(); ++i) {
      if (total + static_cast<int64_t>(i) < cap) {
        positions[total + i] = f.positions[i];
        margins[total + i] = f.margins[i];
      }
    }
    total += f.count;
  }
  return total;
}

}  // namespace

extern "C" {

// x, y: [rows, width] contiguous; rms: [rows]. Returns how many elements have
// |x| <= margin * rms(row); their positions and margins fill positions/margins up to cap (a
// count above cap: the caller asks again with more room, or records them another way).
int64_t gsr_relu_record_f32(const float* x, float* y, float* rms, int64_t rows, int64_t width,
                            float slope, float margin, int64_t* positions, float* margins,
                            int64_t cap, int threads) {
  Job job{x, y, rms, width, slope, margin, true, nullptr, nullptr, 0, cap};
  return run(job, rows, positions, margins, cap, threads);
}

// As above without recording; forces the n_forced (ascending) positions to positive[i] != 0
// (x itself) or not (slope * x), and returns the count of |x| <= margin * rms(row).
int64_t gsr_relu_replay_f32(const float* x, float* y, float* rms, int64_t rows, int64_t width,
                            float slope, float margin, const int64_t* forced,
                            const uint8_t* positive, int64_t n_forced, int threads) {
  Job job{x, y, rms, width, slope, margin, false, forced, positive, n_forced, 0};
  return run(job, rows, nullptr, nullptr, 0, threads);
}

}  // extern "C"
