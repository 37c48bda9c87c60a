"""The base vocabulary: the configuration model (desired state), errors, records, logging."""
