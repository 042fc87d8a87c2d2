// Small-M packed matmul: y (M, N) = x (M, K) @ W.T, binary or ternary W (packed.h), for
// M = 1 .. 8 rows. Template: T (activation dtype), M (the number of rows). Threadgroup (64, 1, 1)
// = GEMV_SIMDGROUPS x 32 lanes; grid (ceil(N / (GEMV_SIMDGROUPS * GEMV_ROWS)) * 64, 1, 1).
// As MLX's qmv_fast: a SIMD-group owns GEMV_ROWS output features; per step each lane loads its
// slice of x (V inputs of each of the M rows) into registers once and reuses it for all
// GEMV_ROWS features, decoding each weight once for all M rows; one scale per row per slice
// (V divides 128); simd_sum at the end. M is a compile-time constant, so every accumulator and
// x register is indexed by unrolled loops (no arrays in memory).

    constexpr int L = M <= 4 ? 16 : 8;  // weights per decoded chunk
    constexpr int C = M == 1 ? 2 : 1;   // chunks per lane per step: M * V x registers <= 64
    constexpr int V = L * C;            // inputs per lane per step

    const int K = x_shape[1];
    const int N = w_shape[0];
    const int units = w_shape[1];
    const int lane = int(thread_index_in_simdgroup);
    const int row0 = (int(threadgroup_position_in_grid.x) * GEMV_SIMDGROUPS
                      + int(simdgroup_index_in_threadgroup)) * GEMV_ROWS;
    if (row0 >= N) {
        return;  // the whole SIMD-group: past the last row
    }

    float acc[M][GEMV_ROWS];
    for (int m = 0; m < M; ++m) {
        for (int r = 0; r < GEMV_ROWS; ++r) {
            acc[m][r] = 0.0f;
        }
    }

    for (int k0 = 0; k0 < K; k0 += 32 * V) {
        const int k = k0 + lane * V;
        if (k < K) {  // (in the last step lanes past the end idle; V divides K)
            float xv[M][V];
            float xsum[M][C];
            for (int m = 0; m < M; ++m) {
                const device T* xr = x + m * K + k;
                for (int c = 0; c < C; ++c) {
                    float total = 0.0f;
                    for (int i = 0; i < L; ++i) {
                        xv[m][c * L + i] = float(xr[c * L + i]);
                        total += xv[m][c * L + i];
                    }
                    xsum[m][c] = total;
                }
            }
            for (int r = 0; r < GEMV_ROWS; ++r) {
                const int n = min(row0 + r, N - 1);  // rows past N: row N - 1 again, not written
                const float s = float(scales[n * (K / GROUP) + k / GROUP]);
                for (int c = 0; c < C; ++c) {
                    const auto codes = weight_codes<L>(w + n * units, k + c * L);
                    for (int m = 0; m < M; ++m) {
                        acc[m][r] += s * chunk_dot<L>(codes, &xv[m][c * L], xsum[m][c]);
                    }
                }
            }
        }
    }

    for (int r = 0; r < GEMV_ROWS; ++r) {
        for (int m = 0; m < M; ++m) {
            const float total = simd_sum(acc[m][r]);
            if (lane == 0 && row0 + r < N) {
                y[m * N + row0 + r] = T(total);
            }
        }
    }
