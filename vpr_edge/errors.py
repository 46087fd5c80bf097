"""One exception family. Messages state what was expected, what was found, and the fix."""

from __future__ import annotations


class VprEdgeError(Exception):
    """Any error a user can act on; the CLI prints it as one line and exits non-zero."""

    exit_code = 2


class ConfigError(VprEdgeError):
    """Unknown preset, bad option value, inconsistent configuration."""


class WeightsError(VprEdgeError):
    """Missing, unreadable or mismatched checkpoint."""


class ArtifactError(VprEdgeError):
    """Missing/corrupt artifact, manifest mismatch, artifact used with the wrong consumer."""


class InputError(VprEdgeError):
    """Unreadable image, empty folder, malformed ground truth."""


class FidelityError(VprEdgeError):
    """An artifact's outputs are outside the tolerance against the reference."""

    exit_code = 3


class MissingDependencyError(VprEdgeError):
    """An optional dependency is not installed; the message names the pip extra."""
