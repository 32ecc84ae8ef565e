import os
import uuid

import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started
conf = conf.replace(retries=0)  # fail at once: this failure is not random
# An input file on the cluster, in a directory every node shares.
path = f"~/{conf.ssh_dir}/input-{uuid.uuid4().hex[:8]}.txt"


def read_number(path):
    with open(os.path.expanduser(path)) as f:
        return int(f.read())


def write(path, text):
    with open(os.path.expanduser(path), "w") as f:
        f.write(text)


def remove(path):
    os.remove(os.path.expanduser(path))


sheepdog.map(write, [(path, "forty-two")], conf, verbose=False)
request_id = sheepdog.map_async(read_number, [path, path], conf)
print(sheepdog.get_results(request_id, conf.dbfile)[0][1])
# prints: None
sheepdog.map(write, [(path, "42")], conf, verbose=False)  # the fix

print(sheepdog.rerun(request_id, conf, ["failed"]))  # the indices rerun
# prints: [1, 2]
print([r for _, r in sheepdog.get_results(request_id, conf.dbfile)])
# prints: [42, 42]
with sheepdog.Storage(conf.dbfile) as storage:
    (earlier,) = storage.get_task_history(request_id, 1)
print(earlier["error"]["type"])
# prints: ValueError
sheepdog.map(remove, [path], conf, verbose=False)  # tidy up
