// Fused packed GEMM: y (M, N) = x (M, K) @ W.T for a binary or ternary packed W (packed.h).
// Threadgroup (128, 1, 1); grid (ceil(N / BN) * 128, ceil(M / BM), 1). Inputs x (M, K) in T,
// w packed, scales float16 (N, K / 128); output y (M, N) in T. K % 128 == 0.
// Each BK step: x tile and unpacked W tile into threadgroup memory (float), then every
// simdgroup multiplies its 32 x 32 block with 8 x 8 simdgroup matrices, float accumulation.

    const int M = x_shape[0];
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int units_per_row = w_shape[1];

    threadgroup float smem[BM * XS_STRIDE + BK * WS_STRIDE];
    threadgroup float* xs = smem;
    threadgroup float* ws = smem + BM * XS_STRIDE;

    const uint tid = thread_index_in_threadgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const int m0 = int(threadgroup_position_in_grid.y) * BM;
    const int n0 = int(threadgroup_position_in_grid.x) * BN;
    const int sm = int(sg / 2) * 32;
    const int sn = int(sg % 2) * 32;

    simdgroup_matrix<float, 8, 8> acc[4][4];
    for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        }
    }

    for (int k0 = 0; k0 < K; k0 += BK) {
        load_x_tile(x, xs, M, K, m0, k0, tid);
        load_w_tile(w, scales, ws, N, K, units_per_row, n0, k0, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int kk = 0; kk < BK; kk += 8) {
            simdgroup_matrix<float, 8, 8> a[4];
            simdgroup_matrix<float, 8, 8> b[4];
            for (int i = 0; i < 4; ++i) {
                simdgroup_load(a[i], xs + (sm + 8 * i) * XS_STRIDE + kk, XS_STRIDE);
            }
            for (int j = 0; j < 4; ++j) {
                simdgroup_load(b[j], ws + kk * WS_STRIDE + sn + 8 * j, WS_STRIDE);
            }
            for (int i = 0; i < 4; ++i) {
                for (int j = 0; j < 4; ++j) {
                    simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    // Epilogue: each simdgroup stages one 8 x 8 block at a time in its own 64 floats of
    // threadgroup memory (free after the last barrier) and writes the in-bounds part.
    threadgroup float* stage = smem + sg * 64;
    const uint lane = thread_index_in_simdgroup;
    const int r = int(lane / 4);
    const int c = int(lane % 4) * 2;
    for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
            simdgroup_store(acc[i][j], stage, 8);
            simdgroup_barrier(mem_flags::mem_threadgroup);
            const int m = m0 + sm + 8 * i + r;
            const int n = n0 + sn + 8 * j + c;
            if (m < M) {
                device T* yr = y + ulong(m) * ulong(N);
                if (n < N) {
                    yr[n] = T(stage[r * 8 + c]);
                }
                if (n + 1 < N) {
                    yr[n + 1] = T(stage[r * 8 + c + 1]);
                }
            }
            simdgroup_barrier(mem_flags::mem_threadgroup);
        }
    }
