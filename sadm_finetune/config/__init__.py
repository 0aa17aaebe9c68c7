"""Typed run configuration: the dataclass sections, YAML files and command-line flags."""
