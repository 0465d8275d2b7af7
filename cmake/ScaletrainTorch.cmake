# Finds LibTorch inside the Python `torch` wheel and defines the imported target `torch`.
#
# Inputs (cache or normal variables):
#   SCALETRAIN_TORCH_DIR          the torch package folder (.../site-packages/torch); asked from
#                                 SCALETRAIN_PYTHON_EXECUTABLE when empty
#   SCALETRAIN_TORCH_WITH_CUDA    ON: use torch's own TorchConfig.cmake, which needs the CUDA toolkit
#
# Without CUDA we import the CPU libraries ourselves: torch's TorchConfig.cmake refuses a CUDA-built
# wheel (the only Linux wheel on PyPI) on a machine that has no CUDA toolkit.
# This file is installed with the package; scaletrainConfig.cmake calls the same macro.
macro(scaletrain_find_torch)
  if(NOT SCALETRAIN_TORCH_DIR)
    if(NOT SCALETRAIN_PYTHON_EXECUTABLE)
      find_program(SCALETRAIN_PYTHON_EXECUTABLE NAMES python3 python REQUIRED)
    endif()
    execute_process(
      COMMAND "${SCALETRAIN_PYTHON_EXECUTABLE}" -c "import os, torch; print(os.path.dirname(torch.__file__))"
      OUTPUT_VARIABLE _st_torch_dir ERROR_VARIABLE _st_torch_err RESULT_VARIABLE _st_torch_rc
      OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT _st_torch_rc EQUAL 0)
      message(FATAL_ERROR "scaletrain: cannot import torch with ${SCALETRAIN_PYTHON_EXECUTABLE}: "
                          "${_st_torch_err}\nRun `make bootstrap`, or pass "
                          "-DSCALETRAIN_TORCH_DIR=<site-packages>/torch.")
    endif()
    set(SCALETRAIN_TORCH_DIR "${_st_torch_dir}" CACHE PATH "torch package folder" FORCE)
  endif()
  if(NOT EXISTS "${SCALETRAIN_TORCH_DIR}/include/torch/csrc/api/include/torch/torch.h")
    message(FATAL_ERROR "scaletrain: SCALETRAIN_TORCH_DIR=${SCALETRAIN_TORCH_DIR} holds no LibTorch headers")
  endif()

  if(SCALETRAIN_TORCH_WITH_CUDA)
    # torch's config still calls the FindCUDA module that newer CMake hides behind CMP0146.
    if(POLICY CMP0146)
      cmake_policy(SET CMP0146 OLD)
    endif()
    find_package(Torch REQUIRED PATHS "${SCALETRAIN_TORCH_DIR}/share/cmake/Torch" NO_DEFAULT_PATH)
  elseif(NOT TARGET torch)
    foreach(_st_lib torch torch_cpu c10)
      find_library(SCALETRAIN_LIB_${_st_lib} ${_st_lib} PATHS "${SCALETRAIN_TORCH_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
    endforeach()
    add_library(torch SHARED IMPORTED)
    set_target_properties(torch PROPERTIES
      IMPORTED_LOCATION "${SCALETRAIN_LIB_torch}"
      INTERFACE_INCLUDE_DIRECTORIES "${SCALETRAIN_TORCH_DIR}/include;${SCALETRAIN_TORCH_DIR}/include/torch/csrc/api/include"
      INTERFACE_LINK_LIBRARIES "${SCALETRAIN_LIB_torch_cpu};${SCALETRAIN_LIB_c10}"
      INTERFACE_COMPILE_DEFINITIONS "USE_DISTRIBUTED;USE_C10D_GLOO;USE_RPC;USE_TENSORPIPE")
    set(TORCH_LIBRARIES torch)
  endif()
  set(SCALETRAIN_TORCH_LIBRARY_DIR "${SCALETRAIN_TORCH_DIR}/lib")
endmacro()
