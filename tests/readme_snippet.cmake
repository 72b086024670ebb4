# Fails unless README.md contains, verbatim, the lines of EXAMPLE between its
# "// README begin" and "// README end" markers (indentation removed), so the
# README's C++ example is code that CI compiles and runs.
# Usage: cmake -DREADME=... -DEXAMPLE=... -P readme_snippet.cmake
file(READ "${README}" readme)
file(READ "${EXAMPLE}" example)
string(FIND "${example}" "// README begin\n" begin)
string(FIND "${example}" "  // README end" end)
if(begin EQUAL -1 OR end EQUAL -1)
  message(FATAL_ERROR "${EXAMPLE}: no '// README begin' ... '// README end' markers")
endif()
# From the begin marker's newline, kept so that every line, the first too,
# loses the two-space indent the example's body has and the README's has not.
math(EXPR begin "${begin} + 15")
math(EXPR length "${end} - ${begin}")
string(SUBSTRING "${example}" ${begin} ${length} snippet)
string(REPLACE "\n  " "\n" snippet "${snippet}")
string(FIND "${readme}" "${snippet}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "README.md does not contain the example of ${EXAMPLE} between its README markers; "
                      "copy it (without the two-space indent):\n${snippet}")
endif()
message(STATUS "README.md holds the example of ${EXAMPLE}")
