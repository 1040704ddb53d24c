"""The label audit (``aol audit``): which labels are wrong (paper 003's Phi, paper 004's C(x) and U(x)), the
label to believe, how good each label set is, and the relabelling curve where the truth is known."""
