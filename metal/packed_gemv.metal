// Small-M packed matmul (M <= 8): y (M, N) = x (M, K) @ W.T, binary or ternary W (packed.h).
// Threadgroup (256, 1, 1) = 8 simdgroups; grid (ceil(N / (8 * GEMV_ROWS)) * 256, 1, 1).
// Each simdgroup owns GEMV_ROWS output features; its lanes stride over the packed units of
// the rows (binary word = 32 inputs, ternary byte = 5) and reduce with simd_sum.

    const int M = x_shape[0];
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int units_per_row = w_shape[1];
    const uint lane = thread_index_in_simdgroup;
    const int row0 = (int(threadgroup_position_in_grid.x) * 8 + int(simdgroup_index_in_threadgroup))
        * GEMV_ROWS;

    for (int r = 0; r < GEMV_ROWS; ++r) {
        const int n = row0 + r;
        if (n >= N) {
            break;  // uniform across the simdgroup
        }
        float acc[GEMV_MAX_M];
        for (int m = 0; m < GEMV_MAX_M; ++m) {
            acc[m] = 0.0f;
        }
        for (int unit = int(lane); unit < units_per_row; unit += 32) {
            gemv_unit(w, scales, x, acc, M, K, units_per_row, n, unit);
        }
        for (int m = 0; m < M; ++m) {
            const float total = simd_sum(acc[m]);
            if (lane == 0) {
                y[ulong(m) * ulong(N) + ulong(n)] = T(total);
            }
        }
    }
