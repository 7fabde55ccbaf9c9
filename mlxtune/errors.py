"""The one exception family mlxtune raises for problems a user can fix.

The CLI catches `MlxtuneError` once, prints its message as a single line and exits 1.
Messages name the file, line or flag at fault and say what to do next.
"""


class MlxtuneError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class ModelLoadError(MlxtuneError):
    """A model directory, hub id, config, weights or tokenizer cannot be used."""


class DataError(MlxtuneError):
    """A dataset file or record cannot be turned into training records."""


class ConfigError(MlxtuneError):
    """A flag, argument or config file value is out of range or inconsistent."""


class AdapterError(MlxtuneError):
    """An adapter file is unreadable or does not belong to the model."""


class TrainingError(MlxtuneError):
    """Training had to stop (for example a non-finite loss)."""


class ExportError(MlxtuneError):
    """A GGUF or chat-app export cannot be written as asked."""


class CheckError(MlxtuneError):
    """A comparison found that an exported model lost the fine-tune (`compare --check`, `export --verify`)."""


class MlxtuneWarning(UserWarning):
    """It worked, but not as asked or not as well as it could (slower path, lost precision): one line."""


class FallbackWarning(MlxtuneWarning):
    """A slower path was taken because the fast one cannot serve this model (said once, in one line)."""
