from _conf import conf

# --8<-- [example]
import sheepdog


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
        print(error.type_name, error.message, "inner_helper" in error.traceback)
        # prints: KeyError 'missing 4' True
