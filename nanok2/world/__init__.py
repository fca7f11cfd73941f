"""An offline research world: a seeded corpus, search/open/python tools, and tasks with gold trajectories.

K2 Thinking's agentic search cannot be trained against the web here, and a small model cannot know the
world anyway; what it can learn is the procedure (search, open, read, follow, compute, answer). This
package generates worlds to learn it in, and serves the same tools over a user's own documents.

    world = build_world(seed=0, size=2000)
    tools = Toolbox(world.corpus)                      # tools.schemas, tools.call(name, arguments)
    tasks = make_tasks(world, tools, "multihop", hops=3, n=10)
"""
from nanok2.world.corpus import Corpus, Doc
from nanok2.world.tasks import FAMILIES, Task, make_tasks, verify
from nanok2.world.tools import SCHEMAS, Toolbox
from nanok2.world.trajectories import SYSTEM_PROMPT, normalize_answer, parse_answer, replay
from nanok2.world.world import World, build_world, load_world, save_world

__all__ = ["Corpus", "Doc", "FAMILIES", "Task", "make_tasks", "verify", "SCHEMAS", "Toolbox", "SYSTEM_PROMPT",
           "normalize_answer", "parse_answer", "replay", "World", "build_world", "load_world", "save_world"]
