/* ws2san.h: the SAN service provider interface (Windows Sockets Direct ws2san.h) on Linux.
 *
 * The public C header of sanreg's SPI: the same function names, parameters, flags, GUIDs and
 * Winsock error values as the original, with Linux base types (see SPI.md). Compiles as C99 and
 * as C++. A switch calls WSPStartupEx to get the procedure table, then WSPIoctl with
 * SIO_GET_EXTENSION_FUNCTION_POINTER and a GUID for each extension function.
 *
 * Thread-safety: every function may be called from any thread, concurrently.
 *
 * Overlapped completion (WSPRdmaWrite, WSPRdmaRead): the call starts the transfer and returns
 * SOCKET_ERROR with *err = WSA_IO_PENDING. While it runs, ov->Internal holds
 * WSS_OPERATION_IN_PROGRESS; when it ends, ov->InternalHigh holds the bytes moved and ov->Internal
 * the Winsock error (0 on success). If the low bit of ov->hEvent is 1 the caller polls with
 * WSPGetOverlappedResult and nothing is signalled; otherwise the provider calls the upcall
 * lpWPUCompleteOverlappedRequest(s, ov, error, bytes, &err) on one of its threads.
 * A non-NULL completion routine (lpCompletionRoutine) is not supported: the call fails with
 * WSAEOPNOTSUPP before starting anything (the switch completes through the upcall instead).
 * ov must stay valid until the completion is observed.
 */
#ifndef SANREG_SPI_WS2SAN_H_
#define SANREG_SPI_WS2SAN_H_

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(SANREG_SPI_BUILD)
#define SANREG_SPI_API __attribute__((visibility("default")))
#else
#define SANREG_SPI_API
#endif

/* Base types (Linux versions). */
typedef uint32_t DWORD;
typedef uint16_t WORD;
typedef uint8_t BYTE;
typedef int BOOL;
typedef int INT;
typedef INT* LPINT;
typedef DWORD* LPDWORD;
typedef void* HANDLE;
typedef void* PVOID;
typedef void* LPVOID;
typedef size_t SIZE_T;
typedef uintptr_t ULONG_PTR;
typedef uintptr_t DWORD_PTR;
typedef uintptr_t SOCKET;
typedef unsigned int GROUP;
typedef uint16_t WCHAR;

#define INVALID_SOCKET ((SOCKET)~(SOCKET)0)
#define SOCKET_ERROR (-1)
#ifndef TRUE
#define TRUE 1
#endif
#ifndef FALSE
#define FALSE 0
#endif

typedef struct _GUID {
  uint32_t Data1;
  uint16_t Data2;
  uint16_t Data3;
  uint8_t Data4[8];
} GUID;

/* Winsock error values. */
#define WSA_IO_PENDING 997
#define WSA_IO_INCOMPLETE 996 /* WSPGetOverlappedResult without waiting, still running */
#define WSA_OPERATION_ABORTED 995
#define WSAEFAULT 10014
#define WSAEINVAL 10022
#define WSAEWOULDBLOCK 10035
#define WSAENOTSOCK 10038
#define WSAEMSGSIZE 10040
#define WSAEOPNOTSUPP 10045
#define WSAEADDRINUSE 10048
#define WSAENETDOWN 10050
#define WSAECONNABORTED 10053
#define WSAECONNRESET 10054
#define WSAENOBUFS 10055
#define WSAENOTCONN 10057
#define WSAECONNREFUSED 10061
#define WSASYSNOTREADY 10091
#define WSAVERNOTSUPPORTED 10092
#define WSANOTINITIALISED 10093

/* ov->Internal while a transfer runs (the original STATUS_PENDING). */
#define WSS_OPERATION_IN_PROGRESS 0x00000103L

/* Ioctl, socket options, memory flags. */
#define SIO_GET_EXTENSION_FUNCTION_POINTER 0xC8000006u
#ifndef SOL_SOCKET
#define SOL_SOCKET 1
#endif
#define SO_MAX_RDMA_SIZE 0x700D
#define SO_RDMA_THRESHOLD_SIZE 0x700E
#define MEM_READ 1
#define MEM_WRITE 2
#define MEM_READWRITE 3

/* The version WSPStartupEx accepts: 2.2. */
#define SANREG_WSP_VERSION ((WORD)0x0202)

/* Buffers and overlapped records. */
typedef struct _WSABUF {
  unsigned long len; /* u_long */
  char* buf;
} WSABUF, *LPWSABUF;

typedef struct _WSABUFEX {
  unsigned long len; /* u_long */
  char* buf;
  HANDLE handle; /* from WSPRegisterMemory */
} WSABUFEX, *LPWSABUFEX;

typedef struct _WSAOVERLAPPED {
  ULONG_PTR Internal;     /* WSS_OPERATION_IN_PROGRESS, then the Winsock error (0: success) */
  ULONG_PTR InternalHigh; /* bytes moved */
  DWORD Offset;
  DWORD OffsetHigh;
  HANDLE hEvent; /* low bit 1: the caller polls; no upcall */
} WSAOVERLAPPED, *LPWSAOVERLAPPED;

typedef void (*LPWSAOVERLAPPED_COMPLETION_ROUTINE)(DWORD error, DWORD bytes,
                                                   LPWSAOVERLAPPED ov, DWORD flags);

typedef struct _WSATHREADID {
  HANDLE ThreadHandle;
  DWORD_PTR Reserved;
} WSATHREADID, *LPWSATHREADID;

typedef struct _QOS {
  char reserved; /* not used on Linux */
} QOS, *LPQOS;

typedef int (*LPCONDITIONPROC)(LPWSABUF caller_id, LPWSABUF caller_data, LPQOS sqos, LPQOS gqos,
                               LPWSABUF callee_id, LPWSABUF callee_data, GROUP* g,
                               DWORD_PTR callback_data);

/* Startup records (minimal Linux versions). */
#define WSPDESCRIPTION_LEN 255
typedef struct WSPData {
  WORD wVersion;
  WORD wHighVersion;
  WCHAR szDescription[WSPDESCRIPTION_LEN + 1];
} WSPDATA, *LPWSPDATA;

#define WSAPROTOCOL_LEN 255
typedef struct _WSAPROTOCOL_INFOW {
  DWORD dwServiceFlags1;
  DWORD dwProviderFlags;
  GUID ProviderId;
  DWORD dwCatalogEntryId;
  int iVersion;
  int iAddressFamily;
  int iSocketType;
  int iProtocol;
  DWORD dwMessageSize;
  WCHAR szProtocol[WSAPROTOCOL_LEN + 1];
} WSAPROTOCOL_INFOW, *LPWSAPROTOCOL_INFOW;

/* The upcalls a switch gives the provider. */
typedef int (*LPWPUCOMPLETEOVERLAPPEDREQUEST)(SOCKET s, LPWSAOVERLAPPED ov, DWORD error,
                                              DWORD bytes, LPINT err);
typedef struct _WSPUPCALLTABLEEX {
  LPWPUCOMPLETEOVERLAPPEDREQUEST lpWPUCompleteOverlappedRequest;
} WSPUPCALLTABLEEX, *LPWSPUPCALLTABLEEX;

/* The procedure table: the original 30 members, names and order. */
typedef SOCKET (*LPWSPACCEPT)(SOCKET s, struct sockaddr* addr, LPINT addrlen, LPCONDITIONPROC cond,
                              DWORD_PTR data, LPINT err);
typedef int (*LPWSPADDRESSTOSTRING)(struct sockaddr* addr, DWORD addrlen, LPWSAPROTOCOL_INFOW info,
                                    WCHAR* out, LPDWORD outlen, LPINT err);
typedef int (*LPWSPASYNCSELECT)(SOCKET s, void* hwnd, unsigned int msg, long events, LPINT err);
typedef int (*LPWSPBIND)(SOCKET s, const struct sockaddr* name, int namelen, LPINT err);
typedef int (*LPWSPCANCELBLOCKINGCALL)(LPINT err);
typedef int (*LPWSPCLEANUP)(LPINT err);
typedef int (*LPWSPCLOSESOCKET)(SOCKET s, LPINT err);
typedef int (*LPWSPCONNECT)(SOCKET s, const struct sockaddr* name, int namelen,
                            LPWSABUF caller_data, LPWSABUF callee_data, LPQOS sqos, LPQOS gqos,
                            LPINT err);
typedef int (*LPWSPDUPLICATESOCKET)(SOCKET s, DWORD pid, LPWSAPROTOCOL_INFOW info, LPINT err);
typedef int (*LPWSPENUMNETWORKEVENTS)(SOCKET s, HANDLE event, void* events, LPINT err);
typedef int (*LPWSPEVENTSELECT)(SOCKET s, HANDLE event, long events, LPINT err);
typedef BOOL (*LPWSPGETOVERLAPPEDRESULT)(SOCKET s, LPWSAOVERLAPPED ov, LPDWORD bytes, BOOL wait,
                                         LPDWORD flags, LPINT err);
typedef int (*LPWSPGETPEERNAME)(SOCKET s, struct sockaddr* name, LPINT namelen, LPINT err);
typedef int (*LPWSPGETSOCKNAME)(SOCKET s, struct sockaddr* name, LPINT namelen, LPINT err);
typedef int (*LPWSPGETSOCKOPT)(SOCKET s, int level, int name, char* val, LPINT len, LPINT err);
typedef BOOL (*LPWSPGETQOSBYNAME)(SOCKET s, LPWSABUF name, LPQOS qos, LPINT err);
typedef int (*LPWSPIOCTL)(SOCKET s, DWORD code, LPVOID in, DWORD in_len, LPVOID out,
                          DWORD out_len, LPDWORD bytes_returned, LPWSAOVERLAPPED ov,
                          LPWSAOVERLAPPED_COMPLETION_ROUTINE routine, LPWSATHREADID thread,
                          LPINT err);
typedef SOCKET (*LPWSPJOINLEAF)(SOCKET s, const struct sockaddr* name, int namelen,
                                LPWSABUF caller_data, LPWSABUF callee_data, LPQOS sqos,
                                LPQOS gqos, DWORD flags, LPINT err);
typedef int (*LPWSPLISTEN)(SOCKET s, int backlog, LPINT err);
typedef int (*LPWSPRECV)(SOCKET s, LPWSABUF bufs, DWORD count, LPDWORD bytes_recvd,
                         LPDWORD flags, LPWSAOVERLAPPED ov,
                         LPWSAOVERLAPPED_COMPLETION_ROUTINE routine, LPWSATHREADID thread,
                         LPINT err);
typedef int (*LPWSPRECVDISCONNECT)(SOCKET s, LPWSABUF data, LPINT err);
typedef int (*LPWSPRECVFROM)(SOCKET s, LPWSABUF bufs, DWORD count, LPDWORD bytes_recvd,
                             LPDWORD flags, struct sockaddr* from, LPINT fromlen,
                             LPWSAOVERLAPPED ov, LPWSAOVERLAPPED_COMPLETION_ROUTINE routine,
                             LPWSATHREADID thread, LPINT err);
typedef int (*LPWSPSELECT)(int nfds, void* readfds, void* writefds, void* exceptfds,
                           const void* timeout, LPINT err);
typedef int (*LPWSPSEND)(SOCKET s, LPWSABUF bufs, DWORD count, LPDWORD bytes_sent, DWORD flags,
                         LPWSAOVERLAPPED ov, LPWSAOVERLAPPED_COMPLETION_ROUTINE routine,
                         LPWSATHREADID thread, LPINT err);
typedef int (*LPWSPSENDDISCONNECT)(SOCKET s, LPWSABUF data, LPINT err);
typedef int (*LPWSPSENDTO)(SOCKET s, LPWSABUF bufs, DWORD count, LPDWORD bytes_sent, DWORD flags,
                           const struct sockaddr* to, int tolen, LPWSAOVERLAPPED ov,
                           LPWSAOVERLAPPED_COMPLETION_ROUTINE routine, LPWSATHREADID thread,
                           LPINT err);
typedef int (*LPWSPSETSOCKOPT)(SOCKET s, int level, int name, const char* val, int len,
                               LPINT err);
typedef int (*LPWSPSHUTDOWN)(SOCKET s, int how, LPINT err);
typedef SOCKET (*LPWSPSOCKET)(int af, int type, int protocol, LPWSAPROTOCOL_INFOW info, GROUP g,
                              DWORD flags, LPINT err);
typedef int (*LPWSPSTRINGTOADDRESS)(WCHAR* str, int af, LPWSAPROTOCOL_INFOW info,
                                    struct sockaddr* addr, LPINT addrlen, LPINT err);

typedef struct _WSPPROC_TABLE {
  LPWSPACCEPT lpWSPAccept;
  LPWSPADDRESSTOSTRING lpWSPAddressToString;
  LPWSPASYNCSELECT lpWSPAsyncSelect;
  LPWSPBIND lpWSPBind;
  LPWSPCANCELBLOCKINGCALL lpWSPCancelBlockingCall;
  LPWSPCLEANUP lpWSPCleanup;
  LPWSPCLOSESOCKET lpWSPCloseSocket;
  LPWSPCONNECT lpWSPConnect;
  LPWSPDUPLICATESOCKET lpWSPDuplicateSocket;
  LPWSPENUMNETWORKEVENTS lpWSPEnumNetworkEvents;
  LPWSPEVENTSELECT lpWSPEventSelect;
  LPWSPGETOVERLAPPEDRESULT lpWSPGetOverlappedResult;
  LPWSPGETPEERNAME lpWSPGetPeerName;
  LPWSPGETSOCKNAME lpWSPGetSockName;
  LPWSPGETSOCKOPT lpWSPGetSockOpt;
  LPWSPGETQOSBYNAME lpWSPGetQOSByName;
  LPWSPIOCTL lpWSPIoctl;
  LPWSPJOINLEAF lpWSPJoinLeaf;
  LPWSPLISTEN lpWSPListen;
  LPWSPRECV lpWSPRecv;
  LPWSPRECVDISCONNECT lpWSPRecvDisconnect;
  LPWSPRECVFROM lpWSPRecvFrom;
  LPWSPSELECT lpWSPSelect;
  LPWSPSEND lpWSPSend;
  LPWSPSENDDISCONNECT lpWSPSendDisconnect;
  LPWSPSENDTO lpWSPSendTo;
  LPWSPSETSOCKOPT lpWSPSetSockOpt;
  LPWSPSHUTDOWN lpWSPShutdown;
  LPWSPSOCKET lpWSPSocket;
  LPWSPSTRINGTOADDRESS lpWSPStringToAddress;
} WSPPROC_TABLE, *LPWSPPROC_TABLE;

/* Extension function GUIDs. */
#define WSAID_REGISTERMEMORY \
  { 0xC0B422F5, 0xF58C, 0x11D1, { 0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D } }
#define WSAID_DEREGISTERMEMORY \
  { 0xC0B422F6, 0xF58C, 0x11D1, { 0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D } }
#define WSAID_REGISTERRDMAMEMORY \
  { 0xC0B422F7, 0xF58C, 0x11D1, { 0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D } }
#define WSAID_DEREGISTERRDMAMEMORY \
  { 0xC0B422F8, 0xF58C, 0x11D1, { 0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D } }
#define WSAID_RDMAWRITE \
  { 0xC0B422F9, 0xF58C, 0x11D1, { 0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D } }
#define WSAID_RDMAREAD \
  { 0xC0B422FA, 0xF58C, 0x11D1, { 0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D } }
#define WSAID_MEMORYREGISTRATIONCACHECALLBACK \
  { 0xE5DA4AF8, 0xD824, 0x48CD, { 0xA7, 0x99, 0x63, 0x37, 0xA9, 0x8E, 0xD2, 0xAF } }

/* Extension function types. */
typedef HANDLE (*LPFN_WSPREGISTERMEMORY)(SOCKET s, PVOID buf, DWORD len, DWORD flags, LPINT err);
typedef int (*LPFN_WSPDEREGISTERMEMORY)(SOCKET s, HANDLE h, LPINT err);
typedef int (*LPFN_WSPREGISTERRDMAMEMORY)(SOCKET s, PVOID buf, DWORD len, DWORD flags,
                                          LPVOID desc, LPDWORD desc_len, LPINT err);
typedef int (*LPFN_WSPDEREGISTERRDMAMEMORY)(SOCKET s, LPVOID desc, DWORD desc_len, LPINT err);
typedef int (*LPFN_WSPRDMAWRITE)(SOCKET s, LPWSABUFEX bufs, DWORD count, LPVOID target_desc,
                                 DWORD target_desc_len, DWORD target_offset, LPDWORD bytes,
                                 DWORD flags, LPWSAOVERLAPPED ov,
                                 LPWSAOVERLAPPED_COMPLETION_ROUTINE routine,
                                 LPWSATHREADID thread, LPINT err);
typedef int (*LPFN_WSPRDMAREAD)(SOCKET s, LPWSABUFEX bufs, DWORD count, LPVOID target_desc,
                                DWORD target_desc_len, DWORD target_offset, LPDWORD bytes,
                                DWORD flags, LPWSAOVERLAPPED ov,
                                LPWSAOVERLAPPED_COMPLETION_ROUTINE routine, LPWSATHREADID thread,
                                LPINT err);
typedef int (*LPFN_WSPMEMORYREGISTRATIONCACHECALLBACK)(LPVOID addr, SIZE_T size, LPINT err);

/* The one exported entry point; everything else is reached through the tables.
 * Returns 0, WSAVERNOTSUPPORTED (version other than 2.2), WSASYSNOTREADY (the fabric cannot be
 * opened: SANREG_FABRIC names a provider libfabric lacks) or WSAEFAULT (NULL procs or upcalls). */
SANREG_SPI_API int WSPStartupEx(WORD version, LPWSPDATA data, LPWSAPROTOCOL_INFOW info,
                                LPWSPUPCALLTABLEEX upcalls, LPWSPPROC_TABLE procs);

#ifdef __cplusplus
}
#endif

#endif /* SANREG_SPI_WS2SAN_H_ */
