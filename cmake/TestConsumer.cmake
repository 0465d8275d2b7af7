# ctest script: install scaletrain from BUILD_DIR into WORK_DIR/prefix, build
# examples/cpp/consumer against it with find_package(scaletrain), and run it.
foreach(var BUILD_DIR SOURCE_DIR WORK_DIR GENERATOR PYTHON)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "TestConsumer.cmake needs -D${var}=...")
  endif()
endforeach()

function(run_step name)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test: ${name} failed (${rc})\n${out}\n${err}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
run_step("install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix)
run_step("configure" ${CMAKE_COMMAND} -S ${SOURCE_DIR}/examples/cpp/consumer -B ${WORK_DIR}/build -G ${GENERATOR}
         -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix -DSCALETRAIN_PYTHON_EXECUTABLE=${PYTHON})
run_step("build" ${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run_step("run" ${WORK_DIR}/build/consumer)
message(STATUS "consumer output:\n${step_output}")
if(NOT step_output MATCHES "consumer: ok")
  message(FATAL_ERROR "consumer test: unexpected output\n${step_output}")
endif()
