// Dequantize a binary or ternary packed W (packed.h) to dense out (N, K) in T.
// Template: T. One thread per 16 consecutive weights of a row: grid (K / 16, N, 1) exactly
// (threads outside the grid do not exist), threadgroup (32, 4, 1). K comes from the scales:
// K = 128 * scales.shape[1]. Each thread writes its 16 outputs as 4 vectors of 4, and the
// lanes of a SIMD-group write 32 consecutive runs: every store is coalesced (as MLX's
// affine_dequantize, which writes a pack's outputs per thread).

    const int units = w_shape[1];
    const int groups = scales_shape[1];
    const int K = GROUP * groups;
    const int k = int(thread_position_in_grid.x) * 16;
    const int n = int(thread_position_in_grid.y);

    const float s = float(scales[n * groups + k / GROUP]);
    const auto codes = weight_codes<16>(w + n * units, k);
    device T* dst = out + n * K + k;
    for (int q = 0; q < 16; q += 4) {
        *((device vec<T, 4>*)(dst + q)) = weights4<T>(codes, q, s);
    }
