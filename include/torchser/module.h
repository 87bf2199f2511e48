#pragma once

/// \file
/// State dicts of LibTorch modules, keyed and ordered as Python's
/// `nn.Module.state_dict()`.
///
/// This header includes `<torch/nn/module.h>` (several seconds to compile);
/// code that only handles state dicts includes `state_dict.h` instead.

#include <torch/nn/module.h>

#include <torchser/export.h>
#include <torchser/state_dict.h>

namespace torchser {

/// Python's `module.state_dict()`: for each module in pre-order, its own
/// parameters, then its own buffers, then its children's entries, with dotted
/// keys ("encoder.layers.0.weight"). Undefined parameters (a Linear without
/// bias) are left out, as Python leaves out `None`.
///
/// The tensors are detached aliases of the module's: they share storage, so
/// tied weights keep one storage identity, and nothing is copied.
///
/// This is the order the planner and the savers follow, and the order a
/// Python model of the same architecture produces, so plans and indexes
/// match Python's key for key. (LibTorch's `named_parameters()` lists every
/// parameter before any buffer, which is a different order.)
TORCHSER_API StateDict state_dict(const torch::nn::Module& module);

} // namespace torchser
