# Helpers for moeforge's own executables (tests, tools, benchmarks). They are
# built for this machine (-march=native): the kernels are only fast with AVX2/FMA
# or better, and the tests must exercise the code paths the tools run.

set(MOEFORGE_DEFAULT_DATA "${PROJECT_SOURCE_DIR}/../shared" CACHE PATH
  "Where tests, examples and benchmarks find models and texts when MOEFORGE_DATA is unset")

# CI also builds the kernel tests for older instruction sets (x86-64-v3: AVX2;
# x86-64: no AVX) to run every SIMD path of the kernels.
set(MOEFORGE_OWN_ARCH native CACHE STRING "-march= of moeforge's own executables")

function(moeforge_own_target target)
  target_link_libraries(${target} PRIVATE moeforge::moeforge)
  target_compile_options(${target} PRIVATE -march=${MOEFORGE_OWN_ARCH} -Wall -Wextra)
  # GCC before 12.3 warns falsely about `__Y` inside its own AVX-512 intrinsic
  # headers whenever Eigen's AVX-512 paths are inlined (GCC bug 105593).
  target_compile_options(${target} PRIVATE
    $<$<AND:$<CXX_COMPILER_ID:GNU>,$<VERSION_LESS:$<CXX_COMPILER_VERSION>,12.3>>:-Wno-uninitialized -Wno-maybe-uninitialized>)
  target_compile_definitions(${target} PRIVATE MOEFORGE_DEFAULT_DATA="${MOEFORGE_DEFAULT_DATA}" MOEFORGE_VERSION="${PROJECT_VERSION}")
  # Unity builds: each of our source files instantiates the same header-only
  # templates (kernel, model, loaders); batching them compiles that code once.
  set_target_properties(${target} PROPERTIES RUNTIME_OUTPUT_DIRECTORY "${PROJECT_BINARY_DIR}/bin" UNITY_BUILD ON)
endfunction()

# For our executables that run expert parallelism when MPI is there: they link
# MPI and see MOEFORGE_WITH_MPI=1.
function(moeforge_use_mpi target)
  if(MOEFORGE_WITH_MPI)
    target_link_libraries(${target} PRIVATE MPI::MPI_CXX)
    target_compile_definitions(${target} PRIVATE MOEFORGE_WITH_MPI=1)
  endif()
endfunction()
