"""Permutation alignment of two models of one architecture: specs, weight matching, activation matching."""
from .activation_matching import activation_matching, activation_similarity, assign
from .apply import apply_permutation, identity_perms, invert, permute_module, random_perms
from .spec import Axis, Group, Layer, PermSpec, spec_for
from .weight_matching import weight_matching

__all__ = ["Axis", "Group", "Layer", "PermSpec", "spec_for", "weight_matching", "activation_matching",
           "activation_similarity", "assign", "apply_permutation", "permute_module", "identity_perms",
           "random_perms", "invert"]
