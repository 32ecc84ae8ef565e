"""The quickstart: a real sheepdog.map on Grid Engine.

Usage: python examples/quickstart.py [CONFIG_JSON]

CONFIG_JSON defaults to .cluster/cluster.json, which `ci/cluster up` writes.
"""

import sys

import sheepdog


def f(a, b):
    return a + b


constant = 12


def g(x):
    return x * 2


def h(a, b):
    # g and constant are found and shipped automatically.
    return a + g(b) + constant


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else ".cluster/cluster.json"
    print("f(a, b) = a + b        ->", sheepdog.map(f, [(1, 1), (1, 2), (2, 2)], config))
    print("h(a, b) = a + 2b + 12  ->", sheepdog.map(h, [(1, 2), (2, 3), (3, 4)], config))
    print("lambda x: x ** 2       ->", sheepdog.map(lambda x: x**2, range(10), config))


if __name__ == "__main__":
    main()
