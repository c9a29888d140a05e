# Included by the top-level CMakeLists.txt when KILN_FUZZ is ON, before any module: every module
# the fuzz targets link is then built with coverage for libFuzzer and with AddressSanitizer and
# UndefinedBehaviorSanitizer, so a finding in a parser's own code is a crash, not a silent read.
# Needs clang (Debian: clang-14, libclang-rt-14-dev, libomp-14-dev); see scripts/fuzz.sh.
if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "KILN_FUZZ=ON needs clang (libFuzzer), e.g. "
                        "-DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14")
endif()
if(KILN_CUDA STREQUAL "ON")
    message(FATAL_ERROR "KILN_FUZZ=ON builds without CUDA: set -DKILN_CUDA=OFF")
endif()
set(KILN_CUDA "OFF" CACHE STRING "Build the CUDA backend: AUTO (when nvcc is found), ON, OFF"
    FORCE)
# Undefined behaviour ends the run (a finding), as a crash does.
add_compile_options(-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all
                    -fno-omit-frame-pointer -g)
add_link_options(-fsanitize=address,undefined)
