// Group-wise top-k selection on CPU: for each row of a [rows, g] float32 matrix, the positions
// (ascending) and values of its k largest entries, in the order of a stable descending sort: equal
// values go to the lower position, -0.0 equals 0.0, NaN is above every number.
//
// torch.topk spends most of its time per row when rows are a few dozen values long. Here LANES
// rows run side by side, one per SIMD lane: each keeps a sorted buffer of the m best entries seen
// so far and every new entry passes down it by compare-exchange, without branches, so the
// compiler vectorises the lane loops. m = k, or for k > g/2 the g - k entries to drop (the same
// loop on complemented keys and reversed positions).
//
// Built at first use by gsr_compiler.runtime.native (a plain C ABI, called through ctypes).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

constexpr int64_t LANES = 16;

// Unsigned keys in the order above; real values map into [0x007FFFFF, 0xFFFFFFFE], so 0 is
// below every key and below every complemented key: the empty buffer slot.
inline uint32_t value_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint32_t key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  key = (v == 0.0f) ? 0x80000000u : key;  // -0.0 == 0.0
  key = (v != v) ? 0xFFFFFFFEu : key;     // NaN above +inf
  return key;
}

// Best m entries of each lane (a row each), held as (key, rank) with rank the position when
// `forward`, else the key complemented and rank = g - 1 - position: then the m best are the m
// largest keys, equal keys ordered by the lower rank. keys: [g][LANES]; best_rank: [m][LANES].
void select_lanes(const uint32_t* keys, int64_t g, int64_t m, bool forward, uint32_t* best_key,
                  uint32_t* best_rank) {
  std::fill(best_key, best_key + m * LANES, 0u);
  std::fill(best_rank, best_rank + m * LANES, 0u);
  const uint32_t flip = forward ? 0u : 0xFFFFFFFFu;
  for (int64_t rank = 0; rank < g; ++rank) {
    const int64_t p = forward ? rank : g - 1 - rank;
    uint32_t ck[LANES], cr[LANES];
    for (int64_t l = 0; l < LANES; ++l) {
      ck[l] = keys[p * LANES + l] ^ flip;
      cr[l] = static_cast<uint32_t>(rank);
    }
    // The entry passes down the sorted buffer; at each slot the better of the two stays.
    for (int64_t i = 0; i < m; ++i) {
      uint32_t* bk = best_key + i * LANES;
      uint32_t* br = best_rank + i * LANES;
      for (int64_t l = 0; l < LANES; ++l) {
        const bool up = ck[l] > bk[l] || (ck[l] == bk[l] && cr[l] < br[l]);
        const uint32_t k_hi = up ? ck[l] : bk[l], k_lo = up ? bk[l] : ck[l];
        const uint32_t r_hi = up ? cr[l] : br[l], r_lo = up ? br[l] : cr[l];
        bk[l] = k_hi;
        br[l] = r_hi;
        ck[l] = k_lo;
        cr[l] = r_lo;
      }
    }
  }
}

void select_rows(const float* x, int64_t begin, int64_t end, int64_t g, int64_t k,
                 int64_t* positions, float* values, float* following) {
  const bool keep = 2 * k <= g;
  const int64_t m = keep ? k : g - k;
  // With `following`, keeping k also tracks the (k+1)-th: one more buffer slot. Dropping g - k
  // already has it: the last slot, the largest of the dropped.
  const int64_t slots = m + ((following && keep) ? 1 : 0);
  std::vector<uint32_t> keys(g * LANES), best_key(std::max<int64_t>(slots, 1) * LANES),
      best_rank(std::max<int64_t>(slots, 1) * LANES);
  // Kept positions of one row as a bitset, read back in ascending order.
  const int64_t words = (g + 63) / 64;
  std::vector<uint64_t> kept(words);
  for (int64_t r0 = begin; r0 < end; r0 += LANES) {
    const int64_t lanes = std::min(LANES, end - r0);
    for (int64_t l = 0; l < LANES; ++l) {
      const float* row = x + (r0 + std::min(l, lanes - 1)) * g;  // spare lanes repeat a row
      for (int64_t p = 0; p < g; ++p) keys[p * LANES + l] = value_key(row[p]);
    }
    if (slots > 0) select_lanes(keys.data(), g, slots, keep, best_key.data(), best_rank.data());
    for (int64_t l = 0; l < lanes; ++l) {
      if (keep) {
        std::fill(kept.begin(), kept.end(), 0);
      } else {
        std::fill(kept.begin(), kept.end(), ~uint64_t{0});
        if (g % 64) kept[words - 1] = (uint64_t{1} << (g % 64)) - 1;
      }
      for (int64_t i = 0; i < m; ++i) {
        const uint32_t rank = best_rank[i * LANES + l];
        const uint32_t p = keep ? rank : static_cast<uint32_t>(g - 1) - rank;
        kept[p / 64] ^= uint64_t{1} << (p % 64);  // set (keep) or clear (drop)
      }
      const float* row = x + (r0 + l) * g;
      if (following) {
        // The largest value not kept: slot k when keeping, slot m - 1 when dropping.
        float next = -std::numeric_limits<float>::infinity();
        if (keep) {
          next = row[best_rank[k * LANES + l]];
        } else if (m > 0) {
          next = row[g - 1 - static_cast<int64_t>(best_rank[(m - 1) * LANES + l])];
        }
        following[r0 + l] = next;
      }
      int64_t* pos_out = positions + (r0 + l) * k;
      float* val_out = values + (r0 + l) * k;
      for (int64_t w = 0, j = 0; w < words; ++w) {
        for (uint64_t bits = kept[w]; bits; bits &= bits - 1) {
          const int64_t p = w * 64 + __builtin_ctzll(bits);
          pos_out[j] = p;
          val_out[j] = row[p];
          ++j;
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// x: [rows, g] contiguous; positions, values: [rows, k]; 1 <= k <= g. following: [rows], the
// largest value not kept (-inf when k == g), or null when not wanted.
void gsr_group_topk_f32(const float* x, int64_t rows, int64_t g, int64_t k, int64_t* positions,
                        float* values, float* following, int threads) {
  // Below ~64k entries a thread costs more than it saves; chunks are whole lane blocks.
  const int64_t blocks = (rows + LANES - 1) / LANES;
  const int64_t n = std::max<int64_t>(
      1, std::min<int64_t>({threads, std::max<int64_t>(1, rows * g / 65536), blocks}));
  const int64_t chunk = (blocks + n - 1) / n * LANES;
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n; ++t) {
    const int64_t begin = std::min(rows, t * chunk), end = std::min(rows, begin + chunk);
    try {
      pool.emplace_back(select_rows, x, begin, end, g, k, positions, values, following);
    } catch (...) {  // no thread to be had: this one does the chunk
      select_rows(x, begin, end, g, k, positions, values, following);
    }
  }
  select_rows(x, 0, std::min(rows, chunk), g, k, positions, values, following);
  for (auto& worker : pool) worker.join();
}

}  // extern "C"
