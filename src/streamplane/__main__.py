from streamplane.lifetime import arm_from_env

arm_from_env()  # first: a child of a stack dies with it, however its parent dies

from streamplane.cli import main  # noqa: E402

main()
