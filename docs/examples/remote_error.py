import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def inner_helper(table, key):
    return table[key]


def lookup(key):
    return inner_helper({"present": 1}, key)


with sheepdog.Executor(conf) as pool:
    future = pool.submit(lookup, "missing 4")
    try:
        future.result()
    except sheepdog.RemoteError as error:
        print(error)  # one line, then the remote traceback
        in_helper = "inner_helper" in error.traceback
        print(error.type_name, error.message, in_helper)
        # prints: KeyError 'missing 4' True
