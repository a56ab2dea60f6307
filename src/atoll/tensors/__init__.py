"""The tensor plane: numpy arrays, CPU torch tensors and large buffers cross
processes through shared memory, and CUDA tensors as CUDA IPC handles, under
leases.

This package knows nothing about actors: the runtime gives each process one
:class:`Plane` and hands it to the codec.
"""

from ._plane import TRANSFERS as TRANSFERS
from ._plane import Plane as Plane
from ._plane import check_transfer as check_transfer
from ._sending import CopyOnSend as CopyOnSend
from ._sending import copy_on_send as copy_on_send
from ._shm import SharedMemoryError as SharedMemoryError
