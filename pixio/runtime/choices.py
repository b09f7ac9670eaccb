"""The values of the shared config's choice keys, in a module that loads no torch: the config
checks (`pixio.runtime.config`) read them before anything heavy is imported, and the modules
that act on them (`compile`, `optim`, `parallel`) import them from here."""

COMPILE_CHOICES = ("auto", "true", "false")  # train.compile
OPTIMIZERS = ("adamw", "lars")  # optim.name
SCHEDULES = ("cosine", "poly", "constant")  # optim.schedule
PARALLEL_CHOICES = ("auto", "none", "ddp", "fsdp")  # train.parallel
