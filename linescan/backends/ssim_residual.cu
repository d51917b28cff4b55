// Fused SSIM residual: one kernel from (input, reconstruction) to 1 - SSIM.
//
// Why one kernel: the CPU path blurs five images (x, y, x^2, y^2, xy) one after another and
// writes each to memory. Here every block loads one tile of input and reconstruction (with a
// LS_RADIUS-pixel apron) into shared memory once, runs the separable window over the four
// moments on chip, and writes only the float32 residual: about 9 bytes of global traffic per
// pixel for 8-bit input instead of ~50.
//
// The arithmetic is the CPU residual's (linescan/ssim.py), so the two agree within 1e-4:
//   * the input is normalised as x * scale (scale = 1 / (2^bits - 1), or 1 for float input),
//   * both images are centred by subtracting half = 0.5 * L before the moments,
//   * four windowed quantities, not five: with xc = x - half, yc = y - half, d = xc - yc,
//         mx = E[xc], my = E[yc], E1 = E[xc^2 + yc^2], Edd = E[d^2]
//         V = E1 - mx^2 - my^2 + C2             (var_x + var_y + C2)
//         Q = Edd - (mx - my)^2                 (var_x + var_y - 2 cov, from the small d)
//         A = 2 mu_x mu_y + C1,  mu = m + half
//         SSIM = A (V - Q) / ((A + (mx - my)^2) V)
//     The term that decides a defect's score (Q) is computed from small numbers instead of as
//     a difference of large ones, which keeps float32 within ~3e-6 of float64 even on flat
//     webs near black or white (tests/test_gpu.py emulates this arithmetic in numpy),
//   * the border is half-sample symmetric reflection (d c b a | a b c d), OpenCV's
//     BORDER_REFLECT, applied to the whole image, never to a tile,
//   * the window is separable: a horizontal pass, then a vertical pass, with the normalised
//     1-D weights in constant memory (set by the loader from SSIMParams.kernel()),
//   * C1 = (K1 L)^2, C2 = (K2 L)^2, population moments.
//
// Layout: row-major 2-D images with row pitches in elements (so views of a band are fine).
// Launch: block (LS_BLOCK_X, LS_BLOCK_Y) = (32, 8), grid (ceil(W / 32), ceil(H / 32)).
// Build: nvcc --ptx -arch=sm_90 [-DLS_RADIUS=r]; the loader compiles it with pycuda at run time.

#ifndef LS_RADIUS
#define LS_RADIUS 5  // window 11, the paper's
#endif

#define LS_TILE_W 32
#define LS_TILE_H 32
#define LS_BLOCK_X 32
#define LS_BLOCK_Y 8
#define LS_ROWS_PER_THREAD (LS_TILE_H / LS_BLOCK_Y)  // vertical-pass outputs per thread
#define LS_TAPS (2 * LS_RADIUS + 1)
#define LS_APRON_W (LS_TILE_W + 2 * LS_RADIUS)
#define LS_APRON_H (LS_TILE_H + 2 * LS_RADIUS)

#if LS_RADIUS < 1 || LS_RADIUS > 10
#error "LS_RADIUS must be in 1..10 (windows 3..21): 48 KiB of shared memory holds the apron"
#endif

// The normalised 1-D window, w[k] for offsets k - LS_RADIUS.
__constant__ float c_window[LS_TAPS];

// Half-sample symmetric reflection of i into [0, n): the period is 2n, so it also holds for
// images narrower than the window (as OpenCV's borderInterpolate with BORDER_REFLECT).
__device__ __forceinline__ int reflect_index(int i, int n) {
    if (i >= 0 && i < n) {
        return i;
    }
    const int period = 2 * n;
    i %= period;
    if (i < 0) {
        i += period;
    }
    return i < n ? i : period - 1 - i;
}

__device__ __forceinline__ float to_float(unsigned char v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(unsigned short v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ void ssim_residual_tile(
    const T* __restrict__ x, const float* __restrict__ y, float* __restrict__ out, int height,
    int width, int x_pitch, int y_pitch, int out_pitch, float scale, float half, float c1,
    float c2) {
    // Centred input and reconstruction with the apron; then the four horizontally filtered
    // moments for every apron row and every output column.
    __shared__ float s_x[LS_APRON_H][LS_APRON_W];
    __shared__ float s_y[LS_APRON_H][LS_APRON_W];
    __shared__ float s_h[4][LS_APRON_H][LS_TILE_W];

    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int tid = ty * LS_BLOCK_X + tx;
    const int x0 = blockIdx.x * LS_TILE_W;
    const int y0 = blockIdx.y * LS_TILE_H;

    // 1. Load the tile and its apron, reflecting at the image's borders.
    for (int i = tid; i < LS_APRON_H * LS_APRON_W; i += LS_BLOCK_X * LS_BLOCK_Y) {
        const int r = i / LS_APRON_W;
        const int c = i - r * LS_APRON_W;
        const int gr = reflect_index(y0 - LS_RADIUS + r, height);
        const int gc = reflect_index(x0 - LS_RADIUS + c, width);
        s_x[r][c] = to_float(x[static_cast<long long>(gr) * x_pitch + gc]) * scale - half;
        s_y[r][c] = y[static_cast<long long>(gr) * y_pitch + gc] - half;
    }
    __syncthreads();

    // 2. Horizontal pass: consecutive threads take consecutive columns (no bank conflicts).
    for (int r = ty; r < LS_APRON_H; r += LS_BLOCK_Y) {
        const float* px = &s_x[r][tx + LS_RADIUS];
        const float* py = &s_y[r][tx + LS_RADIUS];
        const float w0 = c_window[LS_RADIUS];
        const float xc = px[0];
        const float yc = py[0];
        const float dc = xc - yc;
        float mx = w0 * xc;
        float my = w0 * yc;
        float e1 = w0 * (xc * xc + yc * yc);
        float dd = w0 * (dc * dc);
#pragma unroll
        for (int j = 1; j <= LS_RADIUS; ++j) {
            const float w = c_window[LS_RADIUS + j];
            const float xa = px[-j];
            const float xb = px[j];
            const float ya = py[-j];
            const float yb = py[j];
            const float da = xa - ya;
            const float db = xb - yb;
            mx += w * (xa + xb);
            my += w * (ya + yb);
            e1 += w * ((xa * xa + ya * ya) + (xb * xb + yb * yb));
            dd += w * (da * da + db * db);
        }
        s_h[0][r][tx] = mx;
        s_h[1][r][tx] = my;
        s_h[2][r][tx] = e1;
        s_h[3][r][tx] = dd;
    }
    __syncthreads();

    // 3. Vertical pass: each thread owns LS_ROWS_PER_THREAD consecutive rows of one column and
    //    keeps the LS_ROWS_PER_THREAD + 2 * LS_RADIUS values it needs in registers.
    const int col = x0 + tx;
    const int row0 = ty * LS_ROWS_PER_THREAD;  // first output row of this thread, in the tile
    float m[4][LS_ROWS_PER_THREAD];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        float v[LS_ROWS_PER_THREAD + 2 * LS_RADIUS];
#pragma unroll
        for (int i = 0; i < LS_ROWS_PER_THREAD + 2 * LS_RADIUS; ++i) {
            v[i] = s_h[k][row0 + i][tx];
        }
#pragma unroll
        for (int o = 0; o < LS_ROWS_PER_THREAD; ++o) {
            // The symmetric window: the centre tap, then pairs w[j] * (v[-j] + v[+j]).
            float acc = c_window[LS_RADIUS] * v[o + LS_RADIUS];
#pragma unroll
            for (int j = 1; j <= LS_RADIUS; ++j) {
                acc += c_window[LS_RADIUS + j] * (v[o + LS_RADIUS - j] + v[o + LS_RADIUS + j]);
            }
            m[k][o] = acc;
        }
    }
    if (col >= width) {
        return;
    }
#pragma unroll
    for (int o = 0; o < LS_ROWS_PER_THREAD; ++o) {
        const int row = y0 + row0 + o;
        if (row < height) {
            const float mx = m[0][o];
            const float my = m[1][o];
            const float md = mx - my;
            const float md2 = md * md;
            const float q = m[3][o] - md2;                      // var_x + var_y - 2 cov
            const float v = m[2][o] - mx * mx - my * my + c2;  // var_x + var_y + C2
            const float a = 2.0f * ((mx + half) * (my + half)) + c1;
            const float ssim = (a * (v - q)) / ((a + md2) * v);
            out[static_cast<long long>(row) * out_pitch + col] = 1.0f - ssim;
        }
    }
}

#define LS_DEFINE_KERNEL(name, T)                                                           \
    extern "C" __global__ void __launch_bounds__(LS_BLOCK_X * LS_BLOCK_Y) name(              \
        const T* __restrict__ x, const float* __restrict__ y, float* __restrict__ out,      \
        int height, int width, int x_pitch, int y_pitch, int out_pitch, float scale,        \
        float half, float c1, float c2) {                                                   \
        ssim_residual_tile<T>(x, y, out, height, width, x_pitch, y_pitch, out_pitch, scale, \
                              half, c1, c2);                                                \
    }

LS_DEFINE_KERNEL(ssim_residual_u8, unsigned char)
LS_DEFINE_KERNEL(ssim_residual_u16, unsigned short)
LS_DEFINE_KERNEL(ssim_residual_f32, float)
