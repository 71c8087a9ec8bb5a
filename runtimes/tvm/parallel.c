/* Runs a TVM kernel on block ranges from PyTorch's own OpenMP thread pool.
 *
 * `sparsecc_parallel(kernel, threads, blocks, *inputs, output)` calls `kernel(*inputs, b0, b1, output)` (the
 * kernels' argument order: the range just before the output) on `threads` threads, each
 * with its share [b0, b1) of `blocks` work blocks (thread 0 always runs, so a kernel's once-only work keyed on
 * b0 == 0 happens once). The library links the libgomp that torch loaded (same soname), so these are the
 * threads torch's own parallel ops use: no second pool spinning on the cores the other needs.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

#define MAX_ARGS 16

static void set_int(TVMFFIAny* a, int64_t v) {
  memset(a, 0, sizeof(*a));
  a->type_index = kTVMFFIInt;
  a->v_int64 = v;
}

TVM_FFI_DLL_EXPORT int __tvm_ffi_sparsecc_parallel(void* self, const TVMFFIAny* args, int32_t num_args,
                                                   TVMFFIAny* result) {
  (void)self;
  if (num_args < 4 || num_args - 3 + 2 > MAX_ARGS || args[1].type_index != kTVMFFIInt ||
      args[2].type_index != kTVMFFIInt || args[0].type_index < kTVMFFIStaticObjectBegin) {
    TVMFFIErrorSetRaisedFromCStr("ValueError", "sparsecc_parallel(kernel, threads, blocks, *inputs, output): bad arguments");
    return -1;
  }
  TVMFFIObjectHandle kernel = args[0].v_obj;
  int64_t threads = args[1].v_int64, blocks = args[2].v_int64;
  int32_t n = num_args - 3;
  int failed = 0;
  TVMFFIObjectHandle error = NULL;
  if (threads < 1) threads = 1;
#pragma omp parallel num_threads((int)threads)
  {
    int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    if (b0 < b1 || t == 0) {
      TVMFFIAny call[MAX_ARGS], ret;
      memcpy(call, args + 3, (size_t)(n - 1) * sizeof(TVMFFIAny));
      set_int(&call[n - 1], b0);
      set_int(&call[n], b1);
      call[n + 1] = args[3 + n - 1];
      memset(&ret, 0, sizeof(ret));
      ret.type_index = kTVMFFINone;
      if (TVMFFIFunctionCall(kernel, call, n + 2, &ret) != 0) {
        TVMFFIObjectHandle raised = NULL;
        TVMFFIErrorMoveFromRaised(&raised);
#pragma omp critical
        {
          if (!failed) {
            failed = 1;
            error = raised;
            raised = NULL;
          }
        }
        if (raised != NULL) TVMFFIObjectDecRef(raised);
      }
    }
  }
  if (failed) {
    TVMFFIErrorSetRaised(error);
    TVMFFIObjectDecRef(error);
    return -1;
  }
  memset(result, 0, sizeof(*result));
  result->type_index = kTVMFFINone;
  return 0;
}
