from octopus import Octopus, SocketConnection

class EchoConnection(SocketConnection):
    connections = []

    def connect(self):
        self.connections.append(self)

    def receive(self, message):
        for connection in self.connections:
            connection.send(message)

    def close(self):
        self.connections.remove(self)

if __name__ == '__main__':
    server = Octopus(EchoConnection)
    server.listen(9876)
    server.start()
