"""Every sequence mixer; importing this package registers them all (one module per variant family)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")
