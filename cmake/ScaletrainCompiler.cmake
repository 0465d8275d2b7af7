# Compiler settings shared by every scaletrain target: C++17, PIC everywhere (one precompiled
# header serves the library, tests and tools), ccache when present.
if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
endif()
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
set(CMAKE_CXX_EXTENSIONS OFF)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
# Executables need not relink when only the body of libscaletrain.so changed.
set(CMAKE_LINK_DEPENDS_NO_SHARED ON)

find_program(SCALETRAIN_CCACHE ccache)
if(SCALETRAIN_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  # pch_defines/time_macros let ccache cache translation units that use the precompiled header.
  set(_st_launcher "${CMAKE_COMMAND};-E;env;CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime;${SCALETRAIN_CCACHE}")
  set(CMAKE_CXX_COMPILER_LAUNCHER "${_st_launcher}")
  set(CMAKE_CUDA_COMPILER_LAUNCHER "${SCALETRAIN_CCACHE}")
endif()

# Warnings for our own code only (targets call scaletrain_warnings()).
function(scaletrain_warnings target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
endfunction()

# Executables reuse the library's precompiled header; GCC accepts it only when the code model
# flags match, so they are compiled as PIC (not PIE) like the shared library, and with OpenMP
# like it (see the top-level CMakeLists.txt).
function(scaletrain_reuse_pch target)
  target_precompile_headers(${target} REUSE_FROM scaletrain)
  target_link_libraries(${target} PRIVATE scaletrain_openmp)
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE OFF)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fPIC>)
endfunction()
