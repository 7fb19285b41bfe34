"""The one error type of the converters: what is refused, naming the key or tensor."""


class ConversionError(ValueError):
  """A checkpoint or config the converter refuses (the message names key/tensor, value, allowed)."""
