"""MIL methods behind one interface; importing this package registers them all."""

from . import abmil as abmil
from . import ghanet as ghanet
from . import mkd as mkd
from . import momkd as momkd
from . import privileged as privileged
from . import tdc as tdc
from . import wikg as wikg
from .base import Bag as Bag
from .base import DataNeeds as DataNeeds
from .base import MethodCfg as MethodCfg
from .base import MILMethod as MILMethod
from .base import MILOutput as MILOutput
from .base import PatchMap as PatchMap
from .registry import create_method as create_method
from .registry import get_method_class as get_method_class
from .registry import list_methods as list_methods
from .registry import parse_method_name as parse_method_name
from .registry import resolve_config as resolve_config
