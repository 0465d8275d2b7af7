# Decides whether CUDA code is built (SCALETRAIN_WITH_CUDA) and enables the CUDA language.
#
#   -DSCALETRAIN_CUDA=AUTO|ON|OFF          AUTO builds CUDA when nvcc is found and its major version
#                                          matches the torch wheel's CUDA (two CUDA runtimes in one
#                                          process break)
#   -DSCALETRAIN_CUDA_ARCHITECTURES=80;90  what .cu files compile for (90a for Hopper-only code)
set(SCALETRAIN_CUDA "AUTO" CACHE STRING "Build CUDA code: AUTO, ON or OFF")
set_property(CACHE SCALETRAIN_CUDA PROPERTY STRINGS AUTO ON OFF)
set(SCALETRAIN_CUDA_ARCHITECTURES "80;90" CACHE STRING "CUDA architectures for scaletrain kernels")

set(SCALETRAIN_WITH_CUDA OFF)
set(_st_cuda_reason "")
if(NOT SCALETRAIN_CUDA STREQUAL "OFF")
  execute_process(
    COMMAND "${SCALETRAIN_PYTHON_EXECUTABLE}" -c "import torch; print(torch.version.cuda or '')"
    OUTPUT_VARIABLE _st_torch_cuda OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_st_cuda_reason "no CUDA compiler (nvcc) found")
  elseif(NOT _st_torch_cuda)
    set(_st_cuda_reason "the torch wheel is CPU-only")
  else()
    execute_process(COMMAND "${CMAKE_CUDA_COMPILER}" --version OUTPUT_VARIABLE _st_nvcc_version)
    string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _st_match "${_st_nvcc_version}")
    set(_st_nvcc_major "${CMAKE_MATCH_1}")
    set(_st_nvcc_release "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
    string(REGEX MATCH "^([0-9]+)" _st_match "${_st_torch_cuda}")
    if(NOT _st_nvcc_major STREQUAL CMAKE_MATCH_1)
      set(_st_cuda_reason "nvcc is CUDA ${_st_nvcc_major}, torch was built with CUDA ${_st_torch_cuda}")
    elseif(_st_nvcc_release VERSION_LESS 12.1)
      # The multi-tensor kernels take parameter blocks of up to 16 KB (CUDA 12.1 and later).
      set(_st_cuda_reason "nvcc is CUDA ${_st_nvcc_release}, the kernels need 12.1 or later")
    else()
      set(SCALETRAIN_WITH_CUDA ON)
    endif()
  endif()
  if(SCALETRAIN_CUDA STREQUAL "ON" AND NOT SCALETRAIN_WITH_CUDA)
    message(FATAL_ERROR "scaletrain: SCALETRAIN_CUDA=ON but ${_st_cuda_reason}")
  endif()
endif()

if(SCALETRAIN_WITH_CUDA)
  # torch's own CMake reads TORCH_CUDA_ARCH_LIST; without it, it falls back to a list that
  # starts at compute_50, which nvcc 13 rejects.
  set(_st_torch_arches "")
  foreach(_st_arch ${SCALETRAIN_CUDA_ARCHITECTURES})
    string(REGEX REPLACE "^([0-9]+)([0-9])(a?)$" "\\1.\\2\\3" _st_dotted "${_st_arch}")
    list(APPEND _st_torch_arches "${_st_dotted}")
  endforeach()
  set(ENV{TORCH_CUDA_ARCH_LIST} "${_st_torch_arches}")
  set(TORCH_CUDA_ARCH_LIST "${_st_torch_arches}")
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  # torch's CMake ignores (and warns about) CMAKE_CUDA_ARCHITECTURES; our CUDA targets set the
  # CUDA_ARCHITECTURES property from SCALETRAIN_CUDA_ARCHITECTURES instead.
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)
  unset(CMAKE_CUDA_ARCHITECTURES)
  message(STATUS "scaletrain: CUDA ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${SCALETRAIN_CUDA_ARCHITECTURES}")
else()
  if(_st_cuda_reason)
    message(STATUS "scaletrain: CUDA off (${_st_cuda_reason})")
  else()
    message(STATUS "scaletrain: CUDA off (SCALETRAIN_CUDA=OFF)")
  endif()
endif()
