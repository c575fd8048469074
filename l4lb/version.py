"""l4lb's version, in a module of its own so that any layer may say it without importing the
package's lazy public names (`l4lb/__init__.py`)."""

__version__ = "0.1.0"
