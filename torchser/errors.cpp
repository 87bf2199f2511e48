#include <torchser/errors.h>

namespace torchser {

Error::~Error() = default;
ValueError::~ValueError() = default;
KeyError::~KeyError() = default;
RuntimeError::~RuntimeError() = default;
OSError::~OSError() = default;
DistError::~DistError() = default;
DistBackendError::~DistBackendError() = default;
FileNotFoundError::~FileNotFoundError() = default;
LocalEntryNotFoundError::~LocalEntryNotFoundError() = default;
SafetensorError::~SafetensorError() = default;
UnpicklingError::~UnpicklingError() = default;
DDUFError::~DDUFError() = default;
DDUFCorruptedFileError::~DDUFCorruptedFileError() = default;
DDUFExportError::~DDUFExportError() = default;
DDUFInvalidEntryNameError::~DDUFInvalidEntryNameError() = default;

} // namespace torchser
