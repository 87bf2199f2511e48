#pragma once

/// \file
/// Umbrella header: everything torchser offers. Prefer the single headers in
/// code that cares about compile time (module.h pulls in torch::nn).

#include <torchser/consolidate.h>
#include <torchser/constants.h>
#include <torchser/dduf.h>
#include <torchser/distributed.h>
#include <torchser/distributed_load.h>
#include <torchser/errors.h>
#include <torchser/export.h>
#include <torchser/hub_cache.h>
#include <torchser/key_mapping.h>
#include <torchser/load.h>
#include <torchser/load_backend.h>
#include <torchser/module.h>
#include <torchser/ordered_map.h>
#include <torchser/pickle.h>
#include <torchser/process_group.h>
#include <torchser/progress.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>
#include <torchser/shared_tensors.h>
#include <torchser/split.h>
#include <torchser/state_dict.h>
#include <torchser/storage.h>
#include <torchser/version.h>
