from statecast.cli.main import main

main()
