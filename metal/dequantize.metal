// Dequantize a binary or ternary packed W (packed.h) to dense out (N, K) in T.
// One thread per packed unit (binary word / ternary byte): grid (units_per_row, N, 1),
// threadgroup (32, 8, 1). K comes from the scales: K = 128 * scales.shape[1].

    const int N = w_shape[0];
    const int units_per_row = w_shape[1];
    const int K = GROUP * scales_shape[1];
    const int unit = int(thread_position_in_grid.x);
    const int n = int(thread_position_in_grid.y);
    if (unit < units_per_row && n < N) {
        dequantize_unit(w, scales, out, K, units_per_row, n, unit);
    }
