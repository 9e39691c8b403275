"""The ksmd time model: what KSM keeps, and when, as memory changes.

``knobs.py`` (the sysfs knobs the model replays), ``rules.py`` (what changes by kernel
version), ``timeline.py`` (the model's input: pages, their contents and how fast they
change), ``cost.py`` (ksmd's CPU per page and the time a full scan takes), ``advisor.py``
(the scan-time advisor's arithmetic) and ``simulate.py`` (ksmd replayed scan by scan).
Pure computation: nothing here reads ``/proc`` or runs the kernel's KSM (``live/`` does).
"""
