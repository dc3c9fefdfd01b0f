"""The `imagefactory` command line: options, output and exit codes only.

`main.py` is the lazy command group; each other module holds the commands of one domain
package and calls into it. What two commands share lives in a domain package, or, for
options, in `node_options.py`.
"""
