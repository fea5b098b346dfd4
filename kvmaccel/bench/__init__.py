"""kvmaccel.bench: one layer of kvmaccel (its rules are written in a later commit)."""
