# ctest driver: (find_package) installs the build tree into a scratch prefix;
# then configures the consumer project against it and (find_package) builds
# and runs it.
# Inputs: MODE, MOEFORGE_SOURCE, MOEFORGE_BUILD, WORK, GENERATOR.
file(REMOVE_RECURSE "${WORK}")
set(extra)
if(MODE STREQUAL "find_package")
  execute_process(COMMAND "${CMAKE_COMMAND}" --install "${MOEFORGE_BUILD}" --prefix "${WORK}/prefix"
    RESULT_VARIABLE rc OUTPUT_QUIET)
  if(rc)
    message(FATAL_ERROR "installing moeforge failed")
  endif()
  set(extra "-DCMAKE_PREFIX_PATH=${WORK}/prefix")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${MOEFORGE_SOURCE}/tests/consumer" -B "${WORK}/build"
  -G "${GENERATOR}" -DMODE=${MODE} "-DMOEFORGE_SOURCE=${MOEFORGE_SOURCE}" ${extra}
  RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the consumer (${MODE}) failed")
endif()
# add_subdirectory compiles the same headers through the same interface target
# as find_package (only the include path differs, and generating the project
# resolves it), so building and running the consumer once is enough.
if(MODE STREQUAL "add_subdirectory")
  return()
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${WORK}/build" RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the consumer (${MODE}) failed")
endif()
execute_process(COMMAND "${WORK}/build/consumer" RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "the consumer (${MODE}) ran but failed")
endif()
