"""The merge methods, one module per family, each method a function with its ``@merge_method`` declaration
beside it (``registry``); ``reference`` holds mergekit 0.1.5's arithmetic written plainly. The registry
imports these modules by name (``registry.METHOD_MODULES``) on first use.
"""
