// Precompiled header of the library, its tests and tools: the torch headers nearly every
// translation unit includes. Keep it to headers that change only with torch.
#pragma once
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <torch/nn/functional.h>
#include <torch/nn/module.h>
#include <torch/nn/modules.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>
