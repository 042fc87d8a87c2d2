// Fused packed GEMM: y (M, N) = x (M, K) @ W.T for a binary or ternary packed W (packed.h).
// Template: T (activation dtype), BM (64, or 32 for M < 64). Threadgroup (128, 1, 1); grid
// (ceil(N / BN) * 128, ceil(M / BM), 1). Inputs x (M, K) in T, w packed, scales float16
// (N, K / 128); output y (M, N) in T. K % 128 == 0.
// As MLX's qmm_t: per BK step the x tile and the decoded W tile are staged in threadgroup
// memory in T, then each SIMD-group multiplies its (BM / 2) x 32 block as 8 x 8 float
// fragments, read from the tiles element by element (MLX steel's BlockMMA), float accumulation.

    const int M = x_shape[0];
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int units = w_shape[1];
    constexpr int LD = tile_ld<T>();
    constexpr int TM = BM / 16;  // fragment rows per SIMD-group

    threadgroup T smem[(BM + BN) * LD];
    threadgroup T* xs = smem;
    threadgroup T* ws = smem + BM * LD;

    const uint tid = thread_index_in_threadgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    const int m0 = int(threadgroup_position_in_grid.y) * BM;
    const int n0 = int(threadgroup_position_in_grid.x) * BN;
    const int sm = int(sg / 2) * (BM / 2);
    const int sn = int(sg % 2) * 32;
    const int fr = frag_row(lane);
    const int fc = frag_col(lane);

    simdgroup_matrix<float, 8, 8> acc[TM][4];
    for (int i = 0; i < TM; ++i) {
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        }
    }

    float scale = 0.0f;  // this thread's W row scale (load_w_tile)
    for (int k0 = 0; k0 < K; k0 += BK) {
        load_x_tile<BM>(xs, x, M, K, m0, k0, tid);
        load_w_tile(ws, w, scales, scale, N, K, units, n0, k0, tid);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int kk = 0; kk < BK; kk += 8) {
            simdgroup_matrix<float, 8, 8> a[TM];
            simdgroup_matrix<float, 8, 8> b[4];
            for (int i = 0; i < TM; ++i) {
                load_fragment(a[i], xs, sm + 8 * i, kk, lane);
            }
            for (int j = 0; j < 4; ++j) {
                load_fragment_transposed(b[j], ws, sn + 8 * j, kk, lane);
            }
            for (int i = 0; i < TM; ++i) {
                for (int j = 0; j < 4; ++j) {
                    simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // before the next step's tiles
    }

    // Epilogue: each SIMD-group stages 8 rows x 32 columns at a time, in T, in its own 8 rows
    // of the x tile (free after the last barrier); then each lane writes 8 consecutive outputs
    // of one row (4 lanes per row), the in-bounds part only (M, N arbitrary).
    threadgroup T* stage = smem + sg * (8 * LD);
    const int orow = int(lane / 4);
    const int ocol = int(lane % 4) * 8;
    for (int i = 0; i < TM; ++i) {
        for (int j = 0; j < 4; ++j) {
            stage[fr * LD + 8 * j + fc] = T(acc[i][j].thread_elements()[0]);
            stage[fr * LD + 8 * j + fc + 1] = T(acc[i][j].thread_elements()[1]);
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
        const int m = m0 + sm + 8 * i + orow;
        const int n = n0 + sn + ocol;
        if (m < M) {
            device T* yr = y + m * N + n;
            const threadgroup T* src = stage + orow * LD + ocol;
            for (int e = 0; e < 8; ++e) {
                if (n + e < N) {
                    yr[e] = src[e];
                }
            }
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);  // before the next 8 rows are staged
    }
