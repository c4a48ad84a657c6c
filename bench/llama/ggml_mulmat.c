// ggml_mulmat: throughput of ggml's Q4_0 x Q8_0 matrix product on the CPU backend, for
// comparing Petrel's W4 kernels with llama.cpp's on the same shapes (petrel-bench w4a4).
//
// Usage:  ggml_mulmat [--repack 0|1] [--threads T] [--min-ms MS] [--runs R] [--wall] N:K:M ...
//
// For each N:K:M it builds the graph  y = ggml_mul_mat(W, X)  with W a Q4_0 tensor of
// ne = [K, N] (N output rows of K inputs; random weights quantized by ggml_quantize_chunk)
// and X an F32 tensor of ne = [K, M] (M tokens), and times repeated
// ggml_backend_graph_compute on the CPU backend. As in llama.cpp, ggml quantizes X to Q8_0
// inside the mul_mat op, so that conversion is part of the time.
//
// Which path ggml takes (printed as `path=`):
//   --repack 1 (default; what llama-bench does by default): W lives in the CPU_REPACK
//     buffer type, ggml interleaves Q4_0 rows 8 by 8 when the tensor is set, and the op runs
//     the repack traits (x86 AVX2/AVX-512: gemm_q4_0_8x8_q8_0 for groups of 4 tokens,
//     gemv_q4_0_8x8_q8_0 for the rest) -> path=repack-q4_0_8x8.
//   --repack 0: W in a plain CPU buffer; M >= 2 runs llamafile's tinyBLAS_Q0_AVX (sgemm),
//     M = 1 runs ggml_vec_dot_q4_0_q8_0 row by row -> path=tinyblas or path=vec_dot.
//
// Time per call: the best over R runs of at least MS milliseconds each of the mean time of
// a graph compute, measured as this thread's CPU time (CLOCK_THREAD_CPUTIME_ID; with one
// thread ggml computes on the calling thread, so time lost to other processes on a shared
// machine does not count), or wall time with --wall (use it for T > 1).
//
// Output: one line per shape,
//   ggml_mulmat N=576 K=576 M=64 threads=1 repack=1 path=repack-q4_0_8x8 seconds=1.23e-04 gops=345.6
// with gops = 2*M*N*K / seconds / 1e9. Errors go to stderr with a non-zero exit status.
//
// Built by bench/llama/setup.sh against the static ggml libraries of the llama.cpp build.

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

static double now(int wall) {
    struct timespec ts;
    clock_gettime(wall ? CLOCK_MONOTONIC : CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

static double wall_now(void) { return now(1); }

static unsigned long long rng_state = 42;

static float rnd(void) {
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float) ((rng_state >> 33) % 2000) / 1000.0f - 1.0f;
}

// The CPU backend's CPU_REPACK buffer type, or NULL if this build has none.
static ggml_backend_buffer_type_t repack_buft(ggml_backend_t backend) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    ggml_backend_dev_get_extra_bufts_t get =
        (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get) {
        return NULL;
    }
    for (ggml_backend_buffer_type_t * b = get(dev); b && *b; b++) {
        if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) {
            return *b;
        }
    }
    return NULL;
}

static int run_shape(ggml_backend_t backend, int repack, int threads, double min_s, int runs, int wall, long n, long k,
                     long m) {
    if (k % 32 != 0) {
        fprintf(stderr, "ggml_mulmat: K=%ld is not a multiple of 32 (Q4_0 blocks)\n", k);
        return 1;
    }
    struct ggml_init_params wp = { 1024 * 1024, NULL, true };
    struct ggml_context * wctx = ggml_init(wp);  // the weight, in its own buffer
    struct ggml_context * xctx = ggml_init(wp);  // activations and result
    struct ggml_tensor * w = ggml_new_tensor_2d(wctx, GGML_TYPE_Q4_0, k, n);
    struct ggml_tensor * x = ggml_new_tensor_2d(xctx, GGML_TYPE_F32, k, m);
    struct ggml_tensor * y = ggml_mul_mat(xctx, w, x);
    struct ggml_cgraph * graph = ggml_new_graph(xctx);
    ggml_build_forward_expand(graph, y);

    ggml_backend_buffer_type_t wbuft = ggml_backend_get_default_buffer_type(backend);
    if (repack) {
        wbuft = repack_buft(backend);
        if (!wbuft) {
            fprintf(stderr, "ggml_mulmat: this ggml build has no CPU_REPACK buffer type\n");
            return 1;
        }
    }
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, wbuft);
    ggml_backend_buffer_t xbuf = ggml_backend_alloc_ctx_tensors(xctx, backend);
    if (!wbuf || !xbuf) {
        fprintf(stderr, "ggml_mulmat: buffer allocation failed\n");
        return 1;
    }

    float * wf = malloc(sizeof(float) * (size_t) n * (size_t) k);
    float * xf = malloc(sizeof(float) * (size_t) m * (size_t) k);
    void * wq = malloc(ggml_nbytes(w));
    for (long i = 0; i < n * k; i++) wf[i] = rnd();
    for (long i = 0; i < m * k; i++) xf[i] = rnd();
    ggml_quantize_chunk(GGML_TYPE_Q4_0, wf, wq, 0, n, k, NULL);
    ggml_backend_tensor_set(w, wq, 0, ggml_nbytes(w));  // repacks in the CPU_REPACK buffer
    ggml_backend_tensor_set(x, xf, 0, ggml_nbytes(x));

    const char * path;
    if (repack) {
        // The repack buffer type attaches its traits to the tensor when the row count suits
        // an interleaved layout; without traits ggml would refuse the op.
        path = w->extra ? "repack-q4_0_8x8" : "repack-unsupported";
    } else {
        path = m >= 2 ? "tinyblas" : "vec_dot";
    }

    if (ggml_backend_graph_compute(backend, graph) != GGML_STATUS_SUCCESS) {  // warm-up
        fprintf(stderr, "ggml_mulmat: graph compute failed\n");
        return 1;
    }
    double best = 1e30;
    for (int r = 0; r < runs; r++) {
        long calls = 0;
        double w0 = wall_now(), t0 = now(wall);
        while (calls == 0 || wall_now() - w0 < min_s) {
            ggml_backend_graph_compute(backend, graph);
            calls++;
        }
        double per = (now(wall) - t0) / (double) calls;
        if (per < best) best = per;
    }
    double gops = 2.0 * (double) m * (double) n * (double) k / best / 1e9;
    printf("ggml_mulmat N=%ld K=%ld M=%ld threads=%d repack=%d path=%s seconds=%.6e gops=%.3f\n", n, k, m, threads,
           repack, path, best, gops);
    fflush(stdout);

    free(wf);
    free(xf);
    free(wq);
    ggml_backend_buffer_free(wbuf);
    ggml_backend_buffer_free(xbuf);
    ggml_free(wctx);
    ggml_free(xctx);
    return 0;
}

int main(int argc, char ** argv) {
    int repack = 1, threads = 1, runs = 5, wall = 0;
    double min_ms = 150;
    int first_shape = argc;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--repack") == 0 && i + 1 < argc) {
            repack = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--min-ms") == 0 && i + 1 < argc) {
            min_ms = atof(argv[++i]);
        } else if (strcmp(argv[i], "--runs") == 0 && i + 1 < argc) {
            runs = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--wall") == 0) {
            wall = 1;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "usage: ggml_mulmat [--repack 0|1] [--threads T] [--min-ms MS] [--runs R] [--wall] N:K:M ...\n");
            return 2;
        } else {
            first_shape = i;
            break;
        }
    }
    if (first_shape == argc || threads < 1 || runs < 1) {
        fprintf(stderr, "usage: ggml_mulmat [--repack 0|1] [--threads T] [--min-ms MS] [--runs R] [--wall] N:K:M ...\n");
        return 2;
    }
    ggml_backend_t backend = ggml_backend_cpu_init();
    if (!backend) {
        fprintf(stderr, "ggml_mulmat: cannot initialize the CPU backend\n");
        return 1;
    }
    ggml_backend_cpu_set_n_threads(backend, threads);
    for (int i = first_shape; i < argc; i++) {
        long n, k, m;
        if (sscanf(argv[i], "%ld:%ld:%ld", &n, &k, &m) != 3 || n <= 0 || k <= 0 || m <= 0) {
            fprintf(stderr, "ggml_mulmat: bad shape %s (want N:K:M)\n", argv[i]);
            return 2;
        }
        if (run_shape(backend, repack, threads, min_ms / 1000.0, runs, wall, n, k, m) != 0) {
            return 1;
        }
    }
    ggml_backend_free(backend);
    return 0;
}
