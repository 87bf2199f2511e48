#include <torchser/module.h>

namespace torchser {
namespace {

void collect(
    const torch::nn::Module& module,
    const std::string& prefix,
    StateDict& out) {
  for (const auto& item : module.named_parameters(/*recurse=*/false)) {
    if (item.value().defined()) {
      out.insert(prefix + item.key(), item.value().detach());
    }
  }
  for (const auto& item : module.named_buffers(/*recurse=*/false)) {
    if (item.value().defined()) {
      out.insert(prefix + item.key(), item.value().detach());
    }
  }
  // named_children() (unlike named_modules()) does not need the module to be
  // owned by a shared_ptr, so stack-allocated modules work too.
  for (const auto& child : module.named_children()) {
    collect(*child.value(), prefix + child.key() + ".", out);
  }
}

} // namespace

StateDict state_dict(const torch::nn::Module& module) {
  StateDict out("Key");
  collect(module, "", out);
  return out;
}

} // namespace torchser
