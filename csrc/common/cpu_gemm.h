#pragma once
// A register-blocked single-precision GEMM for the per-capability CPU kernel files, used
// where a kernel wants the product written straight into its own epilogue (conv + bias +
// activation) and where ATen's BLAS is slow: the MKL torch ships takes its generic code
// path on non-Intel CPUs (MKL_VERBOSE: "Intel(R) Architecture processors"), which on the
// AVX-512 AMD machine of docs/BENCHMARKS.md runs at half the speed of this kernel.
//
// C[MR x NR] tiles are computed in registers: for each k, one vector row of B is loaded and
// multiplied by MR broadcast elements of A. A is read in place (rows of stride lda, k
// contiguous); B must be laid out with k rows of stride ldb and NR readable columns per
// tile (callers pad it, or gemm_tiles() copies a ragged last strip). The result tile is
// handed to a `store` callback, so the epilogue runs while the tile is in registers.
// Single-threaded: callers parallelize over independent tiles or samples.

#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/isa.h"

namespace pyops::cpu {
inline namespace PYOPS_ISA_NAMESPACE {

namespace gemm {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// 32 vector registers with AVX-512 hold 6 x 4 accumulators plus the B row and a
// broadcast; 16 (AVX2 and below) hold 6 x 2.
constexpr int kRows = 6;
constexpr int kMaxVecs = kVec >= 16 ? 4 : 2;

// Columns of one register tile with `vecs` vectors per row.
constexpr int64_t tile_cols(int vecs) { return vecs * kVec; }

// The widest register tile worth using for n columns: narrower tiles waste less on a
// matrix that has fewer columns than the widest tile.
inline int vecs_for(int64_t n) {
  int vecs = kMaxVecs;
  while (vecs > 1 && tile_cols(vecs / 2) >= n) vecs /= 2;
  return vecs;
}

// The result of one register tile: v[i][j] holds row i, columns [j * kVec, (j+1) * kVec).
// Stores receive the accumulators themselves (a reference to the local array), so that
// the tile is not copied through memory between the reduction and the store.
template <int Vecs>
struct Tile {
  const Vec (&v)[kRows][Vecs];
};

// Where row r of an operand starts, relative to its base pointer: a fixed row stride,
// or a table (an implicit im2col, whose rows are shifted views of one staged image).
struct StridedRows {
  int64_t ld;
  int64_t operator()(int64_t r) const { return r * ld; }
};
struct TableRows {
  const int64_t* offsets;
  int64_t operator()(int64_t r) const { return offsets[r]; }
};

// Where column p of an A row lies, relative to the row's pointer: contiguous, or a table
// (the transposed implicit im2col: A's rows are output pixels, its columns the taps).
struct ContiguousCols {
  int64_t operator()(int64_t p) const { return p; }
};
struct TableCols {
  const int64_t* offsets;
  int64_t operator()(int64_t p) const { return offsets[p]; }
};

// The reduction of one register tile runs over `runs` of A's columns ([begin, begin +
// length) each, in order) and, step by step alongside, over B's rows 0, 1, 2, ...: several
// runs skip columns of A (the discarded columns of wide rows) without copying A.
struct Run {
  int64_t begin, length;
};

// One register tile: A[kRows x runs] @ B[steps x tile_cols(Vecs)], A's rows given as
// pointers (column p at a_cols(p)), row q of B at b + b_rows(q), handed to
// store(tile, row0, rows, col0, cols). The accumulators are locals: written through a
// reference they would be stored back to memory on every step, since a float load may
// alias them. A function of its own: the reduction loop needs 29 of the 32 AVX-512
// registers, and inlined into a caller's loop nest GCC 12 spilled two of B's vectors to
// the stack and reloaded them on every step (seed conv2 forward 7.2 -> 11.7 ms, in one
// activation's instantiation but not another's).
template <int Vecs, typename BRows, typename Store, typename ACols = ContiguousCols>
C10_NOINLINE void multiply_and_store(const float* const (&a_row)[kRows], const Run* runs,
                                     int64_t run_count, const float* b, const BRows& b_rows,
                                     const Store& store, int64_t row0, int rows, int64_t col0,
                                     int64_t cols, const ACols& a_cols = {}) {
  Vec acc[kRows][Vecs];  // zero
  int64_t q = 0;
  for (int64_t r = 0; r < run_count; ++r) {
    const int64_t end = runs[r].begin + runs[r].length;
    for (int64_t p = runs[r].begin; p < end; ++p, ++q) {
      const float* b_q = b + b_rows(q);
      Vec b_row[Vecs];
      for (int v = 0; v < Vecs; ++v) b_row[v] = Vec::loadu(b_q + v * kVec);
      const int64_t a_p = a_cols(p);
      for (int i = 0; i < kRows; ++i) {
        const Vec a_ip(a_row[i][a_p]);
        for (int v = 0; v < Vecs; ++v) acc[i][v] = at::vec::fmadd(a_ip, b_row[v], acc[i][v]);
      }
    }
  }
  store(Tile<Vecs>{acc}, row0, rows, col0, cols);
}

// Writes rows x cols of a tile to dst (row stride ldd), through op(row, vector) if given.
template <int Vecs, typename Op>
inline void store_tile(const Tile<Vecs>& acc, int rows, int64_t cols, float* dst, int64_t ldd,
                       const Op& op) {
  for (int i = 0; i < rows; ++i) {
    float* out = dst + i * ldd;
    for (int v = 0; v < Vecs; ++v) {
      const int64_t left = cols - v * kVec;
      if (left <= 0) break;
      const Vec value = op(i, acc.v[i][v]);
      if (left >= kVec) {
        value.store(out + v * kVec);
      } else {
        value.store(out + v * kVec, static_cast<int>(left));
      }
    }
  }
}

// dst (row stride ldd) += the tile's rows x cols.
template <int Vecs>
inline void accumulate_tile(const Tile<Vecs>& acc, int rows, int64_t cols, float* dst,
                            int64_t ldd) {
  for (int i = 0; i < rows; ++i) {
    float* out = dst + i * ldd;
    for (int v = 0; v < Vecs; ++v) {
      const int64_t left = cols - v * kVec;
      if (left <= 0) break;
      const int count = static_cast<int>(std::min<int64_t>(left, kVec));
      (Vec::loadu(out + v * kVec, count) + acc.v[i][v]).store(out + v * kVec, count);
    }
  }
}

// For every register tile of C[m x n] = A[m x k] @ B[k x n]: computes it and calls
// store(tile, row0, rows, col0, cols). Row r of A starts at a + a_rows(r), its column p
// at a_cols(p) from there; row p of B at b + b_rows(p). B's columns past n up to the next multiple of the tile width are read only
// when `b_padded` says they are readable; otherwise a ragged last strip is first copied into
// a zero-padded buffer. Strips of B are the outer loop, so one strip (k x tile width) stays
// in L1/L2 while every row block of A passes by. Rows of a last partial row block repeat
// A's last row (the store is told how many are real).
template <int Vecs, typename ARows, typename BRows, typename Store,
          typename ACols = ContiguousCols>
void gemm_tiles_with(int64_t m, int64_t n, int64_t k, const float* a, const ARows& a_rows,
                     const float* b, const BRows& b_rows, bool b_padded, const Store& store,
                     const ACols& a_cols = {}) {
  constexpr int64_t kCols = tile_cols(Vecs);
  std::vector<float> ragged;
  for (int64_t col0 = 0; col0 < n; col0 += kCols) {
    const int64_t cols = std::min(kCols, n - col0);
    const bool copy = cols < kCols && !b_padded;
    if (copy) {
      ragged.assign(k * kCols, 0.f);
      for (int64_t p = 0; p < k; ++p) {
        const float* src = b + b_rows(p) + col0;
        std::copy(src, src + cols, ragged.data() + p * kCols);
      }
    }
    for (int64_t row0 = 0; row0 < m; row0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, m - row0));
      const float* a_row[kRows];
      for (int i = 0; i < kRows; ++i) a_row[i] = a + a_rows(row0 + std::min(i, rows - 1));
      const Run all{0, k};
      if (copy) {
        multiply_and_store<Vecs>(a_row, &all, 1, ragged.data(), StridedRows{kCols}, store, row0,
                                 rows, col0, cols, a_cols);
      } else {
        multiply_and_store<Vecs>(a_row, &all, 1, b + col0, b_rows, store, row0, rows, col0,
                                 cols, a_cols);
      }
    }
  }
}

// gemm_tiles_with over runs of A's columns (multiply_runs); B (one row per reduced
// column, row stride ldb) must have readable columns up to the next tile width.
template <int Vecs, typename ARows, typename Store>
void gemm_tiles_runs_with(int64_t m, int64_t n, const float* a, const ARows& a_rows,
                          const Run* runs, int64_t run_count, const float* b, int64_t ldb,
                          const Store& store) {
  constexpr int64_t kCols = tile_cols(Vecs);
  for (int64_t col0 = 0; col0 < n; col0 += kCols) {
    const int64_t cols = std::min(kCols, n - col0);
    for (int64_t row0 = 0; row0 < m; row0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, m - row0));
      const float* a_row[kRows];
      for (int i = 0; i < kRows; ++i) a_row[i] = a + a_rows(row0 + std::min(i, rows - 1));
      multiply_and_store<Vecs>(a_row, runs, run_count, b + col0, StridedRows{ldb}, store, row0,
                               rows, col0, cols);
    }
  }
}

// Calls body(std::integral_constant<int, Vecs>) for the register tile width vecs_for(n).
template <typename Body>
void with_tile_width(int64_t n, const Body& body) {
  switch (vecs_for(n)) {
    case 1:
      return body(std::integral_constant<int, 1>{});
    case 2:
      return body(std::integral_constant<int, 2>{});
    default:
      return body(std::integral_constant<int, kMaxVecs>{});
  }
}

// gemm_tiles_runs_with and gemm_tiles_with for the register tile width vecs_for(n) picks;
// `store` is a generic callable taking any Tile<Vecs>.
template <typename ARows, typename Store>
void gemm_tiles_runs(int64_t m, int64_t n, const float* a, const ARows& a_rows, const Run* runs,
                     int64_t run_count, const float* b, int64_t ldb, const Store& store) {
  with_tile_width(n, [&](auto vecs) {
    gemm_tiles_runs_with<decltype(vecs)::value>(m, n, a, a_rows, runs, run_count, b, ldb, store);
  });
}

template <typename ARows, typename BRows, typename Store>
void gemm_tiles(int64_t m, int64_t n, int64_t k, const float* a, const ARows& a_rows,
                const float* b, const BRows& b_rows, bool b_padded, const Store& store) {
  with_tile_width(n, [&](auto vecs) {
    gemm_tiles_with<decltype(vecs)::value>(m, n, k, a, a_rows, b, b_rows, b_padded, store);
  });
}

}  // namespace gemm
}  // namespace PYOPS_ISA_NAMESPACE
}  // namespace pyops::cpu
