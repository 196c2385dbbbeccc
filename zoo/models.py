"""Imports every family module so its models register. Add one line per new family file."""
import zoo.vision.nextvit  # noqa: F401
import zoo.vision.mobiledets  # noqa: F401
