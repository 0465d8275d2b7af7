# `cmake --install` (make install): the library, headers, the CLI and a CMake package so that
# users write `find_package(scaletrain)` and link `scaletrain::scaletrain`.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(SCALETRAIN_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/scaletrain)

install(TARGETS scaletrain EXPORT scaletrainTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS scaletrain_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/scaletrain DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
  FILES_MATCHING PATTERN "*.h")
install(FILES ${PROJECT_BINARY_DIR}/include/scaletrain/core/version.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/scaletrain/core)
install(EXPORT scaletrainTargets NAMESPACE scaletrain:: DESTINATION ${SCALETRAIN_INSTALL_CMAKEDIR})
install(FILES ${PROJECT_SOURCE_DIR}/cmake/ScaletrainTorch.cmake DESTINATION ${SCALETRAIN_INSTALL_CMAKEDIR})

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/scaletrainConfig.cmake.in
  ${PROJECT_BINARY_DIR}/scaletrainConfig.cmake
  INSTALL_DESTINATION ${SCALETRAIN_INSTALL_CMAKEDIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/scaletrainConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/scaletrainConfig.cmake ${PROJECT_BINARY_DIR}/scaletrainConfigVersion.cmake
  DESTINATION ${SCALETRAIN_INSTALL_CMAKEDIR})
