"""frozen_heap: start-up objects are out of the collector's reach inside, and nothing leaks."""
import gc
import weakref

from loom.frozen_heap import frozen_heap


class Node:
    def __init__(self):
        self.me = self                     # a cycle: only the collector frees it


def test_freezes_inside_and_unfreezes_after():
    before = Node()
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        ref = weakref.ref(before)
        del before
        gc.collect()
        assert ref() is not None           # frozen: a full collection leaves it
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None                   # unfrozen: collected, nothing leaked


def test_garbage_made_inside_is_collected_inside():
    with frozen_heap():
        ref = weakref.ref(Node())
        gc.collect()
        assert ref() is None
